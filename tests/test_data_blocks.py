"""DATA is read in blocks after the header: bytes must arrive exactly as sent, whatever the block
boundaries, dot-stuffed lines and line lengths (property-based, through the real listener)."""

from __future__ import annotations

import itertools
import smtplib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.testing.harness import RelayThread, wait_until
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from tests.conftest import RelayFactory

_counter = itertools.count()


@pytest.fixture
def fast_relay(m365: SimulatedM365, relay_factory: RelayFactory) -> Iterator[RelayThread]:
    m365.exchange.limits.messages_per_minute = 1_000_000  # this test is about bytes, not pacing
    yield relay_factory(delivery={"per_mailbox": {"connections": 3, "per_minute": 0}})

_line = st.one_of(
    st.sampled_from([b"", b".", b"..", b".x", b"..x", b"x.", b" .", b"...\t"]),
    st.binary(min_size=0, max_size=3000).map(lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n")),
    st.integers(min_value=0, max_value=9000).map(lambda n: b"." + b"y" * n),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(lines=st.lists(_line, min_size=0, max_size=40))
def test_body_arrives_byte_for_byte(fast_relay: RelayThread, m365: SimulatedM365, lines: list[bytes]) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    subject = f"blocks {next(_counter)}".encode()
    head = f"From: {STANDARD_MAILBOX}\r\nTo: x@fabrikam.example\r\n".encode()
    raw = head + b"Subject: " + subject + b"\r\n\r\n" + body
    with smtplib.SMTP("127.0.0.1", fast_relay.port, timeout=30) as c:  # smtplib dot-stuffs on the wire
        c.sendmail(STANDARD_MAILBOX, ["x@fabrikam.example"], raw)

    def arrived() -> list[bytes]:
        return [a.content for a in m365.exchange.accepted if b"Subject: " + subject + b"\r\n" in a.content]

    wait_until(lambda: bool(arrived()), 30, "the message at Exchange")
    assert arrived() == [raw]
