"""Hostile message content for the listener, shared by tests/test_security_content.py and the bench
(bench/fuzz_content.py, bench/stall.py): header blocks the relay parses (hand-written and generated
with hypothesis, a test dependency), and the checks that one DATA is one message.

The property: whatever the header block says, the client gets exactly one reply per DATA, the
session stays in step (a NOOP after it gets 250), Exchange stores at most the one message the client
meant (never the one hidden in its body), and no body file or descriptor is left behind.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from hypothesis import strategies as st

from relay.testing.exchange import ExchangeLimits
from relay.testing.harness import RelayProcess, RelayThread, free_port, relay_config, wait_until, write_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from relay.testing.smtp_client import RawSMTP

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


def send_one_fuzzed(relay: RelayThread, m365: SimulatedM365, block: bytes, *, count_fds: bool = True) -> None:
    """The property for one header block (the CI test and bench/fuzz_content.py)."""
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
