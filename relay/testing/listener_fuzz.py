"""Property-based fuzz of the listener, shared by tests/test_security_fuzz.py and
bench/fuzz_listener.py: hypothesis strategies (a test dependency) for connections that mix valid and
invalid commands, AUTH exchanges, messages with smuggling-shaped separators and random bytes, all
pipelined; and :class:`FuzzTarget`, one relay against the simulated Microsoft 365 that runs a case
and checks it (clean replies, no hang, nothing accepted lost, still serving).
"""

from __future__ import annotations

import base64
import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from relay.testing.exchange import ExchangeLimits
from relay.testing.harness import DEMO_PASSWORD, DEMO_USER, RelayThread, relay_config, wait_until
from relay.testing.m365 import STANDARD_MAILBOX, STANDARD_SEND_AS, SimulatedM365
from relay.testing.smtp_client import RawSMTP, plain_blob, simple_body

ACCEPTED_REPLY = re.compile(rb"^250 2\.0\.0 Ok: (?:queued|delivered) as ")
RCPT = "someone@fabrikam.example"
TRAILER = b"\r\n.\r\nQUIT\r\n"

# ---------------------------------------------------------------------------------- strategies

addresses = st.one_of(
    st.sampled_from([STANDARD_MAILBOX, STANDARD_SEND_AS, "ceo@contoso.com", "x@fabrikam.example", "", "<>",
                     "a\x00b@contoso.com", "no-at-sign", "@", "a@b@c", "\u00fc@contoso.com", "a" * 300 + "@x.example"]),
    st.from_regex(r"[a-z0-9.+-]{1,20}@[a-z0-9-]{1,10}\.example", fullmatch=True),
)
texts = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=40)
separators = st.sampled_from([b"\r\n", b"\n", b"\r", b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n..\r\n",
                              b"\r\n.\r", b"\x00"])


@st.composite
def message_body(draw: st.DrawFn) -> bytes:
    """Header lines and body lines with random separators, dot-stuffed, ending in CRLF.CRLF."""
    from_value = draw(st.one_of(addresses.map(lambda a: f"<{a}>"), texts, st.just('"Doe, Jane" <ceo@contoso.com>')))
    parts = [b"From: " + from_value.encode("utf-8", "surrogateescape"), b"Subject: fuzz"]
    for _ in range(draw(st.integers(0, 4))):
        parts.append(draw(st.binary(max_size=60)))
    out = b""
    for p in parts:
        out += p + draw(separators)
    out = out.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def command(name: str) -> st.SearchStrategy[bytes]:
    return st.just(name.encode() + b"\r\n")


steps = st.one_of(
    command("EHLO fuzz.test"), command("HELO fuzz.test"), command("RSET"), command("NOOP"), command("DATA"),
    command("STARTTLS"), command("VRFY x"), command("HELP"), command("AUTH"),
    st.just(f"AUTH PLAIN {plain_blob()}\r\n".encode()),
    st.builds(lambda pw: f"AUTH PLAIN {plain_blob(DEMO_USER, pw)}\r\n".encode(), texts),
    st.builds(lambda b: b"AUTH PLAIN " + base64.b64encode(b) + b"\r\n", st.binary(max_size=80)),
    st.just(b"AUTH LOGIN\r\n" + base64.b64encode(DEMO_USER.encode()) + b"\r\n"
            + base64.b64encode(DEMO_PASSWORD.encode()) + b"\r\n"),
    st.just(b"AUTH LOGIN\r\n*\r\n"), st.just(b"AUTH PLAIN\r\n!!!\r\n"),
    st.builds(lambda a, o: f"MAIL FROM:<{a}>{o}\r\n".encode("utf-8", "surrogateescape"), addresses,
              st.sampled_from(["", " SIZE=100", " SIZE=999999999999", " BODY=8BITMIME", " SMTPUTF8", " FOO=bar"])),
    st.builds(lambda a: f"RCPT TO:<{a}>\r\n".encode("utf-8", "surrogateescape"), addresses),
    st.builds(lambda b: b"DATA\r\n" + b, message_body()),
    st.builds(lambda s, r, b: f"MAIL FROM:<{s}>\r\nRCPT TO:<{r}>\r\nDATA\r\n".encode() + b,
              st.sampled_from([STANDARD_MAILBOX, STANDARD_SEND_AS, "ceo@contoso.com"]),
              st.just(RCPT), message_body()),
    st.binary(min_size=1, max_size=200),                      # random bytes, maybe without CRLF
    st.builds(lambda b: b + b"\r\n", st.binary(max_size=100)),
    st.integers(1000, 20_000).map(lambda n: b"NOOP " + b"x" * n + b"\r\n"),
)


PREAMBLES = {"none": b"", "ehlo": b"EHLO fuzz.test\r\n",
             "auth": f"EHLO fuzz.test\r\nAUTH PLAIN {plain_blob()}\r\n".encode()}


@dataclass
class Case:
    source: str
    preamble: str = "none"
    steps: list[bytes] = field(default_factory=list)

    @property
    def payload(self) -> bytes:
        return PREAMBLES[self.preamble] + b"".join(self.steps) + TRAILER


cases = st.builds(Case, source=st.sampled_from(["127.0.0.1", "127.0.0.2"]),
                  preamble=st.sampled_from(sorted(PREAMBLES)), steps=st.lists(steps, min_size=1, max_size=12))

# ---------------------------------------------------------------------------------- the harness


class FuzzTarget:
    """One simulator and one relay shared by every example (as a long-running daemon would be)."""

    def __init__(self, workdir: Path) -> None:
        limits = ExchangeLimits(messages_per_minute=10**6, recipients_per_day=10**9, concurrent_sessions=50)
        self.m365 = SimulatedM365.standard(workdir / "m365", limits=limits).start()
        (workdir / "relay").mkdir(parents=True, exist_ok=True)
        config = relay_config(self.m365, workdir / "relay", overrides={
            "accept": {"networks": ["127.0.0.1/32"], "auth": "optional"},
            "limits": {"max_message_size": 50_000, "line_length": 1000, "command_line_length": 2048,
                       "idle_timeout": 20, "data_timeout": 20,
                       # a ban would make every later example from that address trivial
                       "auth_failures": {"max": 10**6, "delay": 0, "max_delay": 0}},
            "delivery": {"sync_wait": 10, "timeout": 10, "per_mailbox": {"connections": 3, "per_minute": 0}},
            "observability": {"log_format": "json", "log_level": "warning"},
        })
        self.relay = RelayThread.from_dict(config).start()
        self.port = self.relay.port
        self.accepted_total = 0

    def stop(self) -> None:
        self.relay.stop()
        self.m365.stop()

    def in_spool(self) -> int:
        return len(self.relay.relay.spool.list())

    def at_exchange(self) -> int:
        return len(self.m365.exchange.accepted)

    def settled(self) -> bool:
        """No message in flight: none is both at Exchange and, not yet recorded, in the spool."""
        return not any(e.state.value == "active" for e in self.relay.relay.spool.list())

    def run(self, case: Case) -> None:
        wait_until(self.settled, 20, "deliveries in flight to be recorded")
        before = self.at_exchange() + self.in_spool()
        accepted = 0
        client = RawSMTP(self.port, source=case.source, timeout=20)
        try:
            # the relay may close first (QUIT inside the steps, too many bad commands)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                client.send(case.payload)
            while True:
                try:
                    reply = client.reply()
                except ConnectionError:
                    break
                if ACCEPTED_REPLY.match(reply):
                    accepted += 1
        finally:
            client.close()
        self.accepted_total += accepted
        # Every 250 to DATA is a message at Exchange or in the spool; nothing else appeared.
        # A message may be at Exchange and, for a moment, still in the spool (the client's 250 comes on
        # Exchange's 250, the spool records it just after): wait for the count to settle.
        wait_until(lambda: self.at_exchange() + self.in_spool() == before + accepted, 20, "accepted messages")
        assert self.at_exchange() + self.in_spool() == before + accepted
        wait_until(lambda: self.relay.relay.listener_state.connections.open == 0, 20, "connections to close")
        self.check_still_serving()

    def check_still_serving(self) -> None:
        before = self.at_exchange()
        with RawSMTP(self.port, timeout=20) as c:
            c.ehlo()
            c.login()
            reply = c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("health check"))
            assert ACCEPTED_REPLY.match(reply), reply
            c.expect("QUIT", 221)
        wait_until(lambda: self.at_exchange() > before and self.settled(), 20, "the health-check message at Exchange")
