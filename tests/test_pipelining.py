"""One flight per message: the pipelined paths give the step-by-step path's outcomes, byte for byte.

Three ways to run a transaction against the simulated Exchange, each over its own real TLS session:
``step`` (PIPELINING not used: MAIL, RCPT, DATA, end of data, one reply awaited each), ``pipelining``
(MAIL + RCPT... + DATA in one write, the message after the 354) and ``chunking`` (MAIL + RCPT... +
``BDAT n LAST`` + the message in one write). Every reply of the classifier's table, at every step,
must give the same Outcome on all three, and the simulator must have received the same message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtplib.protocol import normalize_message_line_endings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relay.microsoft.smtp_transaction as smtp_transaction
from relay.config import settings_from_dict
from relay.delivery.classify import Action, Outcome, Scope, Stage, classify_reply
from relay.envelope import Envelope, Route
from relay.microsoft.tokens import TokenProviders
from relay.microsoft.transport import Dispatcher
from relay.microsoft.upstream import SessionPool, Submitter
from relay.testing.harness import relay_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365

MODES = ("step", "pipelining", "chunking")
RCPTS = ("a@fabrikam.example", "b@fabrikam.example", "c@fabrikam.example")
BODY = (b"From: relay@contoso.com\r\nTo: a@fabrikam.example\r\nSubject: one flight\r\n\r\n"
        b"hello\r\n.a line with a leading dot\r\n..two dots\r\n.\r\nthe end\r\n")

#: One reply for each kind of row of the classifier's table that MAIL, RCPT or the end of data can meet.
REPLIES = (
    "451 4.7.0 Temporary server error. Please try again later. PRX2",
    "452 4.5.3 Too many recipients",
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    "550 5.7.1 Delivery not authorized",
    "554 5.6.0 Corrupt message content",
    "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
    "421 4.4.2 Message submission rate for this client has exceeded the configured limit",
    "421 4.3.2 Service not available, closing transmission channel",
    "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; quota",
    "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
    "552 5.3.4 Message size exceeds fixed maximum message size",
    "550 5.2.2 STOREDRV.Submission.Exception:QuotaExceededException",
    "550 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x@contoso.com",
    "554 5.2.253 sender throttled",
    "535 5.7.3 Authentication unsuccessful",
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
    "530 5.7.57 Client not authenticated to send mail.",
    "421 4.7.0 Temporary server error, closing",
    "554 5.5.127 token is too old",
)
_TAIL = re.compile(r"\s*\[[^\]]*\]$")  # [server time id]: differs per reply
_QUEUE_ID = re.compile(r"<[0-9A-F]+@")


@dataclass(frozen=True)
class Script:
    """What the simulated Exchange answers: None is its normal answer."""

    mail: str | None = None
    rcpt: tuple[str | None, ...] = (None, None, None)
    data: str | None = None


@dataclass(frozen=True)
class Seen:
    """An outcome with what varies between runs (queue ids, reply tails) left out, and what arrived."""

    verdict: tuple[Any, ...]
    delivered: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]
    deferred: tuple[str, ...]
    arrived: tuple[tuple[tuple[str, ...], bytes], ...]


def _verdict(outcome: Outcome) -> tuple[Any, ...]:
    v = outcome.verdict
    if v.code is None:  # no reply: lost connection or timeout; aiosmtplib's wording differs by where it noticed
        return (v.action, v.reason, v.scope)
    return (v.action, v.reason, v.scope, v.code, v.enhanced, v.retry_after, v.evict_token,
            _QUEUE_ID.sub("<id@", _TAIL.sub("", v.reply)))


class Bench:
    """A Submitter on one session pool, and the simulator switched per mode."""

    def __init__(self, m365: SimulatedM365, tmp: Path) -> None:
        self.m365 = m365
        self.sim = m365.exchange
        self.sim.limits.messages_per_minute = 1_000_000
        self.config = settings_from_dict(relay_config(m365, tmp))
        self.providers = TokenProviders(self.config.apps)
        self.pool = SessionPool(local_hostname="relay.test", timeout=10, idle_close=60)
        self.smtp = Submitter(self.pool, {a.name: a for a in self.config.apps},
                              {p.app.name: p for p in self.providers})
        self.submitter = Dispatcher(self.smtp, lambda _: 3)
        self.route = Route(app="contoso", mailbox=STANDARD_MAILBOX, sender=STANDARD_MAILBOX)

    async def mode(self, mode: str) -> None:
        """New sessions from now on see the EHLO of ``mode``."""
        await self.pool.close_idle()
        self.sim.wire.pipelining = mode != "step"
        self.sim.wire.chunking = mode == "chunking"
        self.smtp.pipeline = mode != "step"

    async def run(self, mode: str, script: Script, body: bytes | Path = BODY,
                  rcpts: tuple[str, ...] = RCPTS) -> tuple[Outcome, Seen]:
        await self.mode(mode)
        self.sim.clear_faults()
        self.sim.wire.clear()
        if script.mail is not None:
            self.sim.inject("mail", script.mail)
        for rcpt, reply in zip(rcpts, script.rcpt, strict=False):
            if reply is not None:
                self.sim.wire.rcpt_replies[rcpt] = reply
        if script.data is not None:
            self.sim.inject("data", script.data)
        before = len(self.sim.accepted)
        outcome = await self.submitter.submit(self.route, Envelope(STANDARD_MAILBOX, rcpts), body)
        self.sim.clear_faults()
        arrived = tuple((m.rcpt_tos, m.content) for m in self.sim.accepted[before:])
        failed = tuple(sorted((r, v.reason) for r, v in outcome.failed.items()))
        seen = Seen(_verdict(outcome), outcome.delivered, failed, outcome.deferred, arrived)
        return outcome, seen

    async def close(self) -> None:
        await self.pool.close_idle()
        self.providers.close()


@pytest.fixture
async def bench(m365: SimulatedM365, tmp_path: Path) -> AsyncIterator[Bench]:
    b = Bench(m365, tmp_path)
    try:
        yield b
    finally:
        await b.close()


def _committed_divergence(script: Script) -> bool:
    """A refusal of the whole message at RCPT while the server keeps another recipient: step by step
    nothing is sent; with BDAT the message went with the commands (see relay.microsoft.smtp_transaction)."""
    if script.mail is not None or script.data is not None:
        return False
    refused_message = any_accepted = False
    for reply in script.rcpt:
        if reply is None:
            any_accepted = True
        elif int(reply[:3]) == 421:
            return False  # the connection closes: the BDAT after it is never taken
        elif classify_reply(int(reply[:3]), reply[4:], Stage.RCPT).scope is not Scope.RECIPIENT:
            refused_message = True
    return refused_message and any_accepted


async def _check_same(bench: Bench, script: Script) -> dict[str, Seen]:
    seen = {mode: (await bench.run(mode, script))[1] for mode in MODES}
    for mode in ("pipelining", "chunking"):
        if mode == "chunking" and _committed_divergence(script):
            # What the server did is reported: delivered to the recipients it accepted, the rest refused/deferred.
            got = seen[mode]
            assert len(got.arrived) <= 1
            arrived_for = got.arrived[0][0] if got.arrived else ()
            assert got.delivered == arrived_for, (script, got)
            assert set(got.delivered) | {r for r, _ in got.failed} | set(got.deferred) == set(RCPTS)
            continue
        assert seen[mode] == seen["step"], f"{mode} differs from step by step for {script}"
    return seen


# ------------------------------------------------------------------------------------------- outcomes


async def test_every_reply_at_every_step_gives_the_same_outcome(bench: Bench) -> None:
    """The table: each reply at MAIL, at each of three RCPTs and at the end of data, the rest normal."""
    scripts = [Script()]
    for reply in REPLIES:
        scripts.append(Script(mail=reply))
        scripts.append(Script(data=reply))
        for i in range(len(RCPTS)):
            rcpt: list[str | None] = [None, None, None]
            rcpt[i] = reply
            scripts.append(Script(rcpt=tuple(rcpt)))
    actions = set()
    for script in scripts:
        seen = await _check_same(bench, script)
        actions.add(seen["step"].verdict[0])
    assert actions == {Action.DELIVERED, Action.RETRY, Action.HOLD, Action.FAILED}, "the table reaches every action"


_reply = st.one_of(st.none(), st.sampled_from(REPLIES))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mail=st.one_of(st.none(), st.sampled_from(REPLIES[:6])), rcpt=st.tuples(_reply, _reply, _reply),
       data=st.one_of(st.none(), st.sampled_from(REPLIES)))
def test_reply_combinations_give_the_same_outcome(m365: SimulatedM365, tmp_path: Path, mail: str | None,
                                                  rcpt: tuple[str | None, ...], data: str | None) -> None:
    async def main() -> None:
        b = Bench(m365, tmp_path)
        try:
            await _check_same(b, Script(mail=mail, rcpt=rcpt, data=data))
        finally:
            await b.close()

    asyncio.run(main())


async def test_a_message_refusal_at_rcpt_after_bdat_reports_what_exchange_did(bench: Bench) -> None:
    """SendAs refused for the second recipient only: step by step nothing is sent; with BDAT the message
    went in the same flight and Exchange took it for the first: reported delivered there, not retried."""
    script = Script(rcpt=(None, "550 5.7.60 SMTP; Client does not have permissions to send as this sender", None))
    _, step = await bench.run("step", script)
    assert step.arrived == () and step.verdict[0] is Action.FAILED and step.verdict[1] == "sendas_denied"
    outcome, chunked = await bench.run("chunking", script)
    assert chunked.arrived == ((("a@fabrikam.example", "c@fabrikam.example"), normalize_message_line_endings(BODY)),)
    assert outcome.verdict.action is Action.DELIVERED
    assert outcome.delivered == ("a@fabrikam.example", "c@fabrikam.example")
    assert dict(chunked.failed) == {"b@fabrikam.example": "sendas_denied"}


async def test_the_session_is_reused_after_refusals_on_every_path(bench: Bench) -> None:
    """After a refused MAIL or all-refused RCPTs the flight's replies are all read: the session goes on."""
    for mode in MODES:
        await bench.mode(mode)
        made = bench.pool.connections_made
        for script in (Script(mail="550 5.7.1 Delivery not authorized"),
                       Script(rcpt=("550 5.1.10 not found",) * 3), Script()):
            bench.sim.clear_faults()
            bench.sim.wire.clear()
            if script.mail:
                bench.sim.inject("mail", script.mail)
            for r, reply in zip(RCPTS, script.rcpt, strict=True):
                if reply:
                    bench.sim.wire.rcpt_replies[r] = reply
            out = await bench.submitter.submit(bench.route, Envelope(STANDARD_MAILBOX, RCPTS), BODY)
            assert out.verdict.action in (Action.FAILED, Action.DELIVERED), (mode, script, out.verdict)
        assert bench.pool.connections_made == made + 1, f"{mode}: one session for the three messages"


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("n_rcpts", [1, 3])
@pytest.mark.parametrize("mode", MODES)
async def test_round_trips_per_message(bench: Bench, mode: str, n_rcpts: int) -> None:
    """Counted by the simulator: step by step 3 + one per recipient, pipelined 2, with BDAT 1."""
    trips = {"step": 3 + n_rcpts, "pipelining": 2, "chunking": 1}[mode]
    for _ in range(3):
        outcome, seen = await bench.run(mode, Script(), rcpts=RCPTS[:n_rcpts])
        assert outcome.verdict.action is Action.DELIVERED and len(seen.arrived) == 1
        [txn] = bench.sim.wire.wait_for(1)
        assert txn.round_trips == trips, txn
        assert txn.bdat_chunks == (1 if mode == "chunking" else 0)


# ------------------------------------------------------------------------------------------- bytes

_BODIES = [
    b"Subject: dots\r\n\r\n.leading\r\n..double\r\n.\r\n. \r\nend\r\n",
    b"Subject: bare LF\n\nline one\nline two\n.dot after LF\n",
    b"Subject: bare CR\r\rline\rx\r\n",
    b"Subject: no trailing CRLF\r\n\r\nlast line without end",
    b"Subject: ends in a dot\r\n\r\n.",
    b"Subject: mixed\r\n\r\n\r\n\n\r.\n.\r\n..\r",
]


@pytest.mark.parametrize("body", _BODIES, ids=["dots", "bare-lf", "bare-cr", "no-crlf", "end-dot", "mixed"])
@pytest.mark.parametrize("source", ["memory", "file"])
async def test_delivered_bytes_are_identical_on_every_path(bench: Bench, tmp_path: Path, body: bytes,
                                                           source: str) -> None:
    path = tmp_path / "body.eml"
    path.write_bytes(body)
    arrived = set()
    for mode in MODES:
        outcome, seen = await bench.run(mode, Script(), body=path if source == "file" else body, rcpts=RCPTS[:1])
        assert outcome.verdict.action is Action.DELIVERED
        [(_, content)] = seen.arrived
        arrived.add(content)
    assert arrived == {normalize_message_line_endings(body)}, "DATA (dot-stuffed) and BDAT (raw) deliver the same"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"\r\n.", b"\n.\n", b"xyz"]),
                     min_size=1, max_size=40).map(b"".join), chunk=st.integers(min_value=1, max_value=9))
def test_bdat_chunks_from_a_file_carry_the_crlf_message(body: bytes, chunk: int, tmp_path_factory: Any) -> None:
    """A spool file goes as several BDAT chunks (one per block read): their concatenation is the message
    with CRLF line endings, no dot-stuffing, exactly what DATA delivers after un-stuffing."""
    path = tmp_path_factory.mktemp("b") / "m"
    path.write_bytes(body)

    async def collect() -> bytes:
        return b"".join([b async for b in smtp_transaction.wire_blocks(path)])

    old = smtp_transaction.STREAM_CHUNK
    smtp_transaction.STREAM_CHUNK = chunk
    try:
        got = asyncio.run(collect())
    finally:
        smtp_transaction.STREAM_CHUNK = old
    assert got == normalize_message_line_endings(body)
    assert asyncio.run(_from_memory(body)) == got


async def _from_memory(body: bytes) -> bytes:
    return b"".join([b async for b in smtp_transaction.wire_blocks(body)])


async def test_a_file_in_many_bdat_chunks_arrives_whole(bench: Bench, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"Subject: big\r\n\r\n" + b"".join(b".line %d\n" % i for i in range(2000))
    path = tmp_path / "big.eml"
    path.write_bytes(body)
    monkeypatch.setattr(smtp_transaction, "STREAM_CHUNK", 4096)
    outcome, seen = await bench.run("chunking", Script(), body=path, rcpts=RCPTS[:1])
    assert outcome.verdict.action is Action.DELIVERED
    assert seen.arrived[0][1] == normalize_message_line_endings(body)
    [txn] = bench.sim.wire.wait_for(1)
    assert txn.bdat_chunks > 3


# ------------------------------------------------------------------------------------------- the reader


async def test_replies_split_and_joined_anywhere_are_read_in_order() -> None:
    """The flight's reply reader on a real socket: multi-line replies, replies cut mid-line, many in one read."""
    replies = b"250-first\r\n250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n550 5.1.10 nope\r\n250 2.0.0 OK <id>\r\n"
    got: list[aiosmtplib.SMTPResponse] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        for i in range(0, len(replies), 7):  # 7-byte pieces, each flushed
            writer.write(replies[i:i + 7])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, previous = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    reader = smtp_transaction._ReplyReader(transport, previous)
    transport.set_protocol(reader)
    reader.write(b"GO\r\n")
    for _ in range(4):
        got.append(await reader.reply(5))
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await reader.reply(5)
    server.close()
    await server.wait_closed()
    ok = aiosmtplib.SMTPResponse
    assert got == [ok(250, "first\n2.1.0 Sender OK"), ok(250, "2.1.5 Recipient OK"), ok(550, "5.1.10 nope"),
                   ok(250, "2.0.0 OK <id>")]


async def test_a_silent_server_times_out_the_reply() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, previous = await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", port)
    reader = smtp_transaction._ReplyReader(transport, previous)
    transport.set_protocol(reader)
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await reader.reply(0.2)
    transport.close()
    server.close()
    await server.wait_closed()


def test_flight_mode_follows_the_ehlo() -> None:
    smtp = aiosmtplib.SMTP()
    smtp.esmtp_extensions = {"pipelining": "", "chunking": ""}
    assert smtp_transaction.flight_mode(smtp) == "chunking"
    smtp.esmtp_extensions = {"pipelining": ""}
    assert smtp_transaction.flight_mode(smtp) == "pipelining"
    smtp.esmtp_extensions = {"chunking": ""}
    assert smtp_transaction.flight_mode(smtp) is None, "BDAT without PIPELINING: step by step"


# ------------------------------------------------------------------------------------------- failures mid-flight


@pytest.mark.parametrize("mode", MODES)
async def test_a_connection_dropped_in_the_message_is_retried_on_a_new_session(bench: Bench, mode: str) -> None:
    await bench.mode(mode)
    bench.sim.drop_mid_data()
    before = len(bench.sim.accepted)
    outcome = await bench.submitter.submit(bench.route, Envelope(STANDARD_MAILBOX, RCPTS[:1]), BODY)
    assert outcome.verdict.action is Action.RETRY and outcome.verdict.reason == "connection", outcome.verdict
    assert outcome.deferred == RCPTS[:1] and len(bench.sim.accepted) == before
    assert bench.pool.open_sessions(STANDARD_MAILBOX) == 0, "the broken session is not pooled"
    outcome = await bench.submitter.submit(bench.route, Envelope(STANDARD_MAILBOX, RCPTS[:1]), BODY)
    assert outcome.verdict.action is Action.DELIVERED
    assert bench.sim.accepted[-1].content == normalize_message_line_endings(BODY)


@pytest.mark.parametrize("mode", MODES)
async def test_a_server_that_stops_answering_times_out(bench: Bench, mode: str) -> None:
    bench.pool.timeout = 0.3
    await bench.run(mode, Script(), rcpts=RCPTS[:1])  # a pooled, authenticated session
    bench.sim.set_reply_delay(1.0)
    try:
        outcome = await bench.submitter.submit(bench.route, Envelope(STANDARD_MAILBOX, RCPTS[:1]), BODY)
    finally:
        bench.sim.set_reply_delay(0)
    assert outcome.verdict.action is Action.RETRY and outcome.verdict.reason == "timeout", outcome.verdict
    assert bench.pool.open_sessions(STANDARD_MAILBOX) == 0, "a session out of step is closed, never reused"


async def test_a_421_to_mail_while_a_big_message_is_still_going_out(bench: Bench, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Exchange answers MAIL with 421 and closes while BDAT chunks are still being written: the 421 is
    what the outcome says (wait a minute), not a lost connection, as on the step-by-step path."""
    path = tmp_path / "big.eml"
    path.write_bytes(b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 4000)
    monkeypatch.setattr(smtp_transaction, "STREAM_CHUNK", 16 * 1024)
    rate = "421 4.4.2 Message submission rate for this client has exceeded the configured limit"
    seen = {mode: (await bench.run(mode, Script(mail=rate), body=path))[1] for mode in MODES}
    assert seen["step"].verdict[:2] == (Action.RETRY, "rate_limited")
    assert seen["chunking"] == seen["step"] == seen["pipelining"]
