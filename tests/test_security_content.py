"""Hostile message *content* at the real listener: header blocks the relay parses.

Raw bytes over a real socket to a relay running against the simulated Microsoft 365, then checks at
the simulated Exchange. The property everywhere: one DATA is one message. Whatever the header block
says, the client gets exactly one reply per DATA, the session stays in step (a NOOP after it gets
250), Exchange stores at most the one message the client meant (never the one hidden in its body),
and no body file or descriptor is left behind. The payloads, the generated header blocks and the
checks are in relay/testing/hostile_content.py (shared with the bench).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from relay.testing.harness import RelayThread
from relay.testing.hostile_content import (
    PAYLOADS,
    RCPT,
    SMUGGLED_RCPT,
    STALL_PAYLOADS,
    assert_nothing_left,
    header_blocks,
    hostile,
    noop_latency_under_attack,
    open_fds,
    send_one_fuzzed,
    start_fuzz_target,
)
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from relay.testing.smtp_client import RawSMTP


def test_hostile_from_headers_never_smuggle_a_second_message(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port) as warm:  # the first message opens what stays open (spool, upstream)
        warm.ehlo()
        warm.login()
        assert warm.send_mail(STANDARD_MAILBOX, [RCPT], hostile(b"From: " + STANDARD_MAILBOX.encode()
                                                                  + b"\r\n")).startswith(b"250")
    m365.exchange.wait_for_messages(1, timeout=15)
    fds_before = open_fds()
    replies: dict[str, bytes] = {}
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        for name, header in PAYLOADS.items():
            replies[name] = c.send_mail(STANDARD_MAILBOX, [RCPT], hostile(header))
            # In step: the very next reply is the NOOP's, not one for a smuggled command.
            assert c.cmd("NOOP").startswith(b"250 2.0.0"), (name, c.transcript[-3:])
        c.expect("QUIT", 221)
    for name, reply in replies.items():
        assert reply[:1] in (b"2", b"4", b"5") and reply[4:5].isdigit(), (name, reply)
    assert replies["leading continuation"].startswith(b"554 5.6.0")
    accepted_count = 1 + sum(r.startswith(b"250") for r in replies.values())
    accepted = m365.exchange.wait_for_messages(accepted_count, timeout=30)
    assert len(accepted) == accepted_count
    for message in accepted:
        assert message.rcpt_tos == (RCPT,)
        assert SMUGGLED_RCPT not in message.rcpt_tos
        head = message.content.split(b"\r\n\r\n", 1)[0]
        assert b"\x00" not in head, head[:200]
    assert_nothing_left(relay, fds_before)


def test_no_smuggling_through_a_failing_header_check(relay: RelayThread, m365: SimulatedM365) -> None:
    """Any exception while judging headers (here: forced) gives one 451 after the end of data."""

    def broken(*_args: object) -> object:
        raise AttributeError("'Group' object has no attribute 'local_part'")

    relay.relay.listener_state.policy.header_from = broken  # type: ignore[assignment]
    fds_before = open_fds()
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        for _ in range(20):
            reply = c.send_mail(STANDARD_MAILBOX, [RCPT], hostile(b"From: relay@contoso.com\r\n"))
            assert reply.startswith(b"451 4.3.0"), reply
            assert c.cmd("NOOP").startswith(b"250 2.0.0")
        c.expect("QUIT", 221)
    assert m365.exchange.accepted == []
    assert_nothing_left(relay, fds_before)


def test_a_pathological_from_does_not_stall_other_clients(m365: SimulatedM365, tmp_path: Path) -> None:
    """While 72 KB pathological From fields are received and judged, another connection's NOOP
    round trip stays under 100 ms. The relay runs as its own process (as in production), so the
    test's clients do not compete with it for one interpreter. On a shared 2-core machine the OS
    alone can hold any process back for 100 ms now and then, so 95 % of the round trips must stay
    under 100 ms and none may reach 1 s (before bounded parsing, one NOOP waited for seconds).
    ``python bench/stall.py`` measures the same on a quiet machine."""
    latencies, replies = noop_latency_under_attack(m365, tmp_path)
    assert len(replies) == len(STALL_PAYLOADS) * 3, replies
    assert all(r.startswith(b"250") for r in replies), replies
    assert len(latencies) > 20
    p95, worst = latencies[int(len(latencies) * 0.95)], latencies[-1]
    assert p95 < 0.1, f"95th percentile NOOP {p95 * 1000:.0f} ms while hostile From fields were judged"
    assert worst < 1.0, f"a NOOP took {worst * 1000:.0f} ms while hostile From fields were judged"


def test_nul_never_reaches_a_rewritten_reply_to(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        body = b"From: \"Boss\x00\" <ceo@contoso.com>\r\nTo: someone@fabrikam.example\r\n\r\nhi\r\n.\r\n"
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], body).startswith(b"250")
    (message,) = m365.exchange.wait_for_messages(1, timeout=15)
    head = message.content.split(b"\r\n\r\n", 1)[0]
    assert b"\x00" not in head
    assert f"From: <{STANDARD_MAILBOX}>".encode() in head, head


# ------------------------------------------------------------------------------ content fuzzing


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayThread, SimulatedM365]]:
    relay, sim = start_fuzz_target(tmp_path_factory.mktemp("content-fuzz"))
    try:
        yield relay, sim
    finally:
        relay.stop()
        sim.stop()


@settings(max_examples=int(os.environ.get("CONTENT_FUZZ_EXAMPLES", "100")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(block=header_blocks())
def test_content_fuzz_one_data_is_one_message(fuzz_target: tuple[RelayThread, SimulatedM365],
                                              block: bytes) -> None:
    relay, m365 = fuzz_target
    send_one_fuzzed(relay, m365, block)


@pytest.mark.parametrize("path", ["<" + '"' * 3000 + ">", "<" + "(" * 3000 + "a@b.example>", "<" + "a." * 1500 + ">"],
                         ids=["quotes", "nested comments", "dots"])
def test_hostile_paths_get_a_precise_refusal_at_once(relay: RelayThread, path: str) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        for _ in range(20):  # each one used to take the event loop for ~0.15 s, or raise RecursionError
            assert c.cmd(f"MAIL FROM:{path}").startswith(b"553 5.1.3"), c.transcript[-1]
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)
        assert c.cmd(f"RCPT TO:{path}").startswith(b"553 5.1.3"), c.transcript[-1]
        c.expect("NOOP", 250)
