"""Pacing: a burst for one mailbox waits in the spool instead of hitting Exchange's 30 messages/minute.

The relay and the simulated Microsoft 365 share one fake clock: the simulated Exchange stamps each
accepted message with it (and enforces its own 30/minute limit with it), and the relay's scheduler
sleeps on it. The test moves the clock only when the relay has nothing left to do at the current
instant, straight to the scheduler's next wake-up: 100 messages take about three fake minutes and a
few real seconds.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.testing.harness import DEMO_PASSWORD, DEMO_USER, RelayThread, wait_until
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from tests.conftest import RelayFactory
from tests.fakeclock import FakeClock

LIMIT = 30


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def m365(tmp_path: Path, clock: FakeClock) -> Iterator[SimulatedM365]:
    """The simulated Microsoft 365 on the test's fake clock (the relays of ``relay_factory`` use it)."""
    sim = SimulatedM365.standard(tmp_path / "m365", clock=clock).start()
    try:
        yield sim
    finally:
        sim.stop()


def start_relay(relay_factory: RelayFactory, clock: FakeClock, **delivery: object) -> RelayThread:
    def sleep_on_the_fake_clock(relay: RelayThread) -> None:
        relay.relay.delivery.sleep = clock.sleep  # the scheduler sleeps on the fake clock too

    return relay_factory(delivery={"retry": {"first": 5, "max": 60}, **delivery}, clock=clock,
                         prepare=sleep_on_the_fake_clock)


def quiet(relay: RelayThread, clock: FakeClock) -> bool:
    """Nothing in flight and the scheduler asleep on the fake clock (checked on the relay's loop)."""

    async def check() -> bool:
        return relay.relay.delivery.idle() and clock.sleepers > 0

    return bool(relay.call(check()))


def drive(relay: RelayThread, clock: FakeClock, done: Callable[[], bool], *, limit: float) -> None:
    """Advance the fake clock to each wake-up of the scheduler until ``done()`` (fake ``limit`` s)."""
    end = clock() + limit
    while not done():
        assert clock() < end, f"not done after {limit} s of fake time"
        wait_until(lambda: quiet(relay, clock) or done(), 30, "the relay to settle",
                   interval=0.002)
        if done():
            break
        deadline = clock.next_deadline()
        assert deadline is not None
        clock.set(deadline)


def test_100_messages_for_one_mailbox_never_exceed_30_per_minute(relay_factory: RelayFactory, m365: SimulatedM365,
                                                                 clock: FakeClock) -> None:
    relay = start_relay(relay_factory, clock, per_mailbox={"per_minute": LIMIT, "connections": 3})
    try:
        start = clock()
        replies = []
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
            client.login(DEMO_USER, DEMO_PASSWORD)
            for i in range(100):
                msg = (f"From: {STANDARD_MAILBOX}\r\nTo: x{i}@fabrikam.example\r\nSubject: burst {i}\r\n\r\n"
                       f"message {i}\r\n")
                client.mail(STANDARD_MAILBOX)
                client.rcpt(f"x{i}@fabrikam.example")
                replies.append(client.data(msg.encode()))
        assert all(code == 250 for code, _ in replies)
        # The first minute's share goes at once (sync path), the rest waits in the spool.
        assert sum(b"delivered as" in text for _, text in replies) == LIMIT
        drive(relay, clock, lambda: len(m365.exchange.accepted) >= 100, limit=600)
        # Paced, not throttled: Exchange never had to refuse anything (421 4.4.2 would be deferred).
        assert b"relay_messages_deferred_total{" not in relay.relay.metrics.render()
    finally:
        relay.stop()

    accepted = m365.exchange.accepted
    assert len(accepted) == 100
    assert sorted(int(a.content.split(b"message ")[1].split(b"\r")[0]) for a in accepted) == list(range(100))
    times = sorted(a.accepted_at for a in accepted)
    for i in range(len(times) - LIMIT):
        window = times[i + LIMIT] - times[i]
        assert window >= 60, f"{LIMIT + 1} messages accepted within {window} s at Exchange"
    # Pacing costs no more than the limit requires.
    assert times[-1] - start <= 3 * 61 + 5
    assert m365.exchange.stats().messages_accepted == 100
