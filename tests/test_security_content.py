"""Hostile message *content* at the real listener: header blocks the relay parses.

Raw bytes over a real socket to a relay running against the simulated Microsoft 365, then checks at
the simulated Exchange. The property everywhere: one DATA is one message. Whatever the header block
says, the client gets exactly one reply per DATA, the session stays in step (a NOOP after it gets
250), Exchange stores at most the one message the client meant (never the one hidden in its body),
and no body file or descriptor is left behind.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.testing.exchange import ExchangeLimits
from relay.testing.harness import RelayProcess, RelayThread, free_port, relay_config, wait_until, write_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from tests.smtp_client import RawSMTP

RCPT = "someone@fabrikam.example"
SMUGGLED_RCPT = "smuggled@evil.example"
#: A second transaction hidden in the body: read as commands only if the session loses step.
SMUGGLED = (f"RSET\r\nMAIL FROM:<{STANDARD_MAILBOX}>\r\nRCPT TO:<{SMUGGLED_RCPT}>\r\nDATA\r\n"
            f"From: {STANDARD_MAILBOX}\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n").encode()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def hostile(from_header: bytes) -> bytes:
    return (from_header + f"To: {RCPT}\r\nSubject: hostile\r\n\r\nbody\r\n".encode() + SMUGGLED)


PAYLOADS = {
    "empty group twice": b"From: g:;;\r\n",
    "group list": b"From: g: ;, h: a@b.example;\r\n",
    "group with semicolons": b"From: g: a@b.example;;;\r\n",
    "colons": b"From: " + b":" * 3000 + b"\r\n",
    "nested comments": b"From: " + b"(" * 500 + b"x" + b")" * 500 + b" <ceo@contoso.com>\r\n",
    "open comments": b"From: " + b"(" * 900 + b"\r\n",
    "quotes": b"From: " + b"\"" * 900 + b"\r\n",
    "quoted pairs": b"From: \"" + b"\\\"" * 400 + b"\r\n",
    "route": b"From: <@evil.example:ceo@contoso.com>\r\n",
    "NUL": b"From: \"CEO\x00\" <ceo@contoso.com>\r\n",
    "space before colon": b"From : ceo@contoso.com\r\n",
    "leading continuation": b" From: ceo@contoso.com\r\n",
    "Sender group": b"Sender: g:;;\r\n",
    "folded 72 KB of quotes": b"From: " + b"\r\n ".join([b"\"" * 70] * 1000) + b"\r\n",
}


def assert_nothing_left(relay: RelayThread, fds_before: int) -> None:
    state = relay.relay.listener_state
    wait_until(lambda: state.connections.open == 0, 10, "connections to close")
    tmp = relay.relay.spool.tmp_dir
    wait_until(lambda: not any(tmp.iterdir()), 10, f"spool tmp files to go: {list(tmp.iterdir())}")
    wait_until(lambda: open_fds() <= fds_before, 10, "descriptors to be closed")


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

    relay.relay.listener_state.policy.header_from = broken  # type: ignore[method-assign]
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


STALL_PAYLOADS = [PAYLOADS["folded 72 KB of quotes"],
                  b"From: " + b"\r\n ".join([b"a." * 35] * 1000) + b"\r\n",
                  b"From: " + b"\r\n ".join([b"a, " * 23] * 1000) + b"\r\n",
                  PAYLOADS["quotes"], PAYLOADS["open comments"], b"From: " + b"a " * 450 + b"\r\n"]


def noop_latency_under_attack(m365: SimulatedM365, workdir: Path, rounds: int = 3) -> tuple[list[float], list[bytes]]:
    """A relay process; one client sends ``rounds`` x the pathological From fields while another
    times NOOP round trips. (sorted NOOP latencies in seconds, the attacker's DATA replies)."""
    m365.exchange.limits.messages_per_minute = 10**6
    port = free_port()
    config = write_config(relay_config(m365, workdir, port=port, overrides={
        "delivery": {"per_mailbox": {"connections": 3, "per_minute": 0}},
        "observability": {"log_level": "error"}}), workdir / "relay.yaml")
    process = RelayProcess(config).start(port)
    done = threading.Event()
    replies: list[bytes] = []
    latencies: list[float] = []

    def attacker() -> None:
        try:
            with RawSMTP(port, timeout=60) as c:
                c.ehlo()
                c.login()
                for header in STALL_PAYLOADS * rounds:
                    replies.append(c.send_mail(STANDARD_MAILBOX, [RCPT], hostile(header)))
        finally:
            done.set()

    try:
        with RawSMTP(port) as other:
            other.ehlo()
            thread = threading.Thread(target=attacker, daemon=True)
            thread.start()
            deadline = time.monotonic() + 60 * rounds
            while not done.is_set() and time.monotonic() < deadline:
                started = time.perf_counter()
                other.expect("NOOP", 250)
                latencies.append(time.perf_counter() - started)
            thread.join(10)
    finally:
        assert process.terminate() == 0
    return sorted(latencies), replies


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

#: RFC 5322 grammar pieces, valid and obsolete, plus odd bytes: what a header block is built from.
ATOMS = st.sampled_from(["a", "relay", "contoso.com", "ceo", "x.y", "=?utf-8?q?=40?=", "=?utf-8?b?PGV2aWw+?="])
PIECES = st.one_of(
    ATOMS,
    st.sampled_from(["@", "<", ">", ":", ";", ",", ".", "\"", "\\", "(", ")", "[", "]", " ", "\t", "\r\n ",
                     "\x00", "\x7f", "\u00fc", "\udcff", "g:;", "g: a@b.example;", "<@route:a@b.example>",
                     f"<{STANDARD_MAILBOX}>", STANDARD_MAILBOX, "ceo@contoso.com", "\"Doe, Jane\"",
                     "(comment (nested))", "\"q\\\"uoted\""]),
    st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=8),
)
NAMES = st.sampled_from(["From", "from", "FROM", "From ", "From\t", "Sender", "Sender ", "Reply-To",
                         "Message-ID", "Subject", "X-Odd", " From", "\tFrom"])


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    fields = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(NAMES)
        value = "".join(draw(st.lists(PIECES, max_size=12)))
        repeat = draw(st.sampled_from([1, 1, 1, 50, 400]))  # sometimes long runs
        fields.append(f"{name}: {value * repeat}".encode("utf-8", "surrogateescape"))
    block = b"\r\n".join(fields).replace(b"\r\n.", b"\r\n..")
    if block.startswith(b"."):
        block = b"." + block
    return block + b"\r\n"


def start_fuzz_target(tmp: Path) -> tuple[RelayThread, SimulatedM365]:
    """One simulator and one relay for many examples; no pacing (Exchange's 30 a minute would make
    the 31st accepted message wait a minute), one message opened first so descriptors can be counted."""
    limits = ExchangeLimits(messages_per_minute=10**6, recipients_per_day=10**9, concurrent_sessions=50)
    sim = SimulatedM365.standard(tmp / "m365", limits=limits).start()
    (tmp / "relay").mkdir(parents=True, exist_ok=True)
    relay = RelayThread.from_dict(relay_config(sim, tmp / "relay", overrides={
        "delivery": {"per_mailbox": {"connections": 3, "per_minute": 0}},
        "observability": {"log_format": "json", "log_level": "error"},
    })).start()
    send_one_fuzzed(relay, sim, f"From: {STANDARD_MAILBOX}\r\n".encode(), count_fds=False)
    return relay, sim


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayThread, SimulatedM365]]:
    relay, sim = start_fuzz_target(tmp_path_factory.mktemp("content-fuzz"))
    try:
        yield relay, sim
    finally:
        relay.stop()
        sim.stop()


def send_one_fuzzed(relay: RelayThread, m365: SimulatedM365, block: bytes, *, count_fds: bool = True) -> None:
    """The property for one header block (shared with bench/fuzz_content.py)."""
    before = len(m365.exchange.accepted)
    fds_before = open_fds()
    with RawSMTP(relay.port, timeout=10) as c:
        c.ehlo()
        c.login()
        started = time.perf_counter()
        reply = c.send_mail(STANDARD_MAILBOX, [RCPT], block + f"To: {RCPT}\r\n\r\nbody\r\n".encode() + SMUGGLED)
        took = time.perf_counter() - started
        assert reply[:1] in (b"2", b"4", b"5") and reply[4:5].isdigit(), reply
        assert c.cmd("NOOP").startswith(b"250 2.0.0"), c.transcript[-3:]
        c.expect("QUIT", 221)
    assert took < 1.0, f"DATA reply after {took:.2f} s"
    expected = before + (1 if reply.startswith(b"250") else 0)
    if expected > before:
        m365.exchange.wait_for_messages(expected, timeout=15)
    accepted = m365.exchange.accepted
    assert len(accepted) == expected
    assert all(m.rcpt_tos == (RCPT,) for m in accepted[before:])
    assert_nothing_left(relay, fds_before if count_fds else 1 << 30)


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
