"""Upstream sessions: reused across messages, at most N per mailbox, dead ones replaced; no blocking on the loop."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay.testing.harness import wait_until
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from tests.conftest import RelayFactory


def _send(port: int, n: int) -> None:
    raw = (f"From: {STANDARD_MAILBOX}\r\nTo: x@fabrikam.example\r\nSubject: pool {n}\r\n\r\nbody {n}\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail(STANDARD_MAILBOX, ["x@fabrikam.example"], raw)


def test_sessions_are_reused_and_limited_per_mailbox(m365: SimulatedM365, relay_factory: RelayFactory) -> None:
    m365.exchange.limits.messages_per_minute = 10_000
    relay = relay_factory(delivery={"per_mailbox": {"connections": 3, "per_minute": 0}})
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda n: _send(relay.port, n), range(60)))
    wait_until(lambda: len(m365.exchange.accepted) == 60, 60, "60 messages at Exchange")
    stats = m365.exchange.stats()
    assert stats.connections <= 3, f"{stats.connections} connections for 60 messages"
    assert stats.max_concurrent_sessions.get(STANDARD_MAILBOX, 0) <= 3
    assert m365.entra.token_requests == 1


def test_no_blocking_call_on_the_event_loop(m365: SimulatedM365, relay_factory: RelayFactory,
                                            caplog: pytest.LogCaptureFixture) -> None:
    relay = relay_factory()
    loop = relay.loop
    loop.call_soon_threadsafe(loop.set_debug, True)
    # A blocking call (a CA bundle load, a password hash, a file fsync) takes 50-150 ms; the margin
    # absorbs a loaded CI machine.
    loop.slow_callback_duration = 0.3
    relay.call(asyncio.sleep(0))
    caplog.set_level(logging.WARNING, logger="asyncio")
    for n in range(20):
        _send(relay.port, n)
    wait_until(lambda: len(m365.exchange.accepted) == 20, 30, "20 messages")
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert not slow, slow
