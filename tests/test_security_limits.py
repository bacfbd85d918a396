"""Abuse limits: failed logins, connections, idle clients. Real sockets, bounded waits."""

from __future__ import annotations

import pytest

from relay.config import LimitSettings
from relay.intake import replies as R
from relay.intake.limits import Admitted, AuthLimiter, Connections
from relay.testing.harness import RelayThread, wait_until
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from relay.testing.smtp_client import RawSMTP, plain_blob, simple_body
from tests.conftest import RelayFactory
from tests.fakeclock import FakeClock

RCPT = "someone@fabrikam.example"
FAST_TARPIT = {"delay": 0.001, "max_delay": 0.005}


def test_fifty_wrong_passwords_ban_the_client(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"auth_failures": {"max": 50, "window": 600, "ban": 900, **FAST_TARPIT}})
    attempts = 0
    refused = b""
    # 10 connections x 5 wrong passwords, alternating known and unknown user names
    for _ in range(10):
        with RawSMTP(relay.port) as c:
            c.ehlo()
            for _ in range(5):
                attempts += 1
                user = "erp" if attempts % 2 else "admin"
                reply = c.cmd(f"AUTH PLAIN {plain_blob(user, f'guess-{attempts}')}")
                if attempts < 50:
                    assert reply.startswith(b"535 5.7.8"), (attempts, reply)
                else:
                    refused = reply
            if attempts == 50:
                assert c.closed()
    assert refused.startswith(b"421 4.7.0")
    # The banned address: refused at the greeting, even with the right password.
    with RawSMTP(relay.port, greet=False) as c:
        assert c.reply().startswith(b"421 4.7.0")
        assert c.closed()
    # Every loopback address is the same client (one local process could rotate through 127/8);
    # other addresses are unaffected (test_limiter_bans_an_ipv6_client_by_its_64_and_mapped_ipv4_as_ipv4).
    with RawSMTP(relay.port, source="127.0.0.2", greet=False) as c:
        assert c.reply().startswith(b"421 4.7.0")
        assert c.closed()
    state = relay.relay.listener_state
    assert not state.auth_limiter.banned("192.0.2.1")
    # When the ban is over, the right password works again.
    state.auth_limiter._clock = FakeClock(state.auth_limiter._clock() + 901)
    with RawSMTP(relay.port, source="127.0.0.2") as c:
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("after the ban")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_default_threshold_bans_before_fifty(relay_factory: RelayFactory) -> None:
    relay = relay_factory(limits={"auth_failures": FAST_TARPIT})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        replies = []
        for i in range(50):
            reply = c.cmd(f"AUTH PLAIN {plain_blob('erp', f'wrong{i}')}")
            replies.append(reply[:3])
            if reply.startswith(b"421"):
                break
        assert replies == [b"535"] * 9 + [b"421"]  # default max: 10
        assert c.closed()


def test_success_does_not_reset_the_count(relay_factory: RelayFactory) -> None:
    """A login between failures does not give a guesser a fresh count: the third failure in the
    window bans, logins or not."""
    relay = relay_factory(limits={"auth_failures": {"max": 3, **FAST_TARPIT}})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd(f"AUTH PLAIN {plain_blob('erp', 'typo')}").startswith(b"535")
        assert c.cmd(f"AUTH PLAIN {plain_blob('erp', 'typo')}").startswith(b"535")
        c.login()
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd(f"AUTH PLAIN {plain_blob('erp', 'typo')}").startswith(b"421 4.7.0")
        assert c.closed()


def test_limiter_unit_window_ban_expiry_and_bound() -> None:
    clock = FakeClock(1000.0)
    lim = AuthLimiter(3, window=60, ban=300, clock=clock, max_tracked=100)
    assert lim.failed("a") == 1 and lim.failed("a") == 2
    clock.advance(61)  # the first two fall out of the window
    assert lim.failed("a") == 1 and not lim.banned("a")
    lim.failed("a"), lim.failed("a")
    assert lim.banned("a") and not lim.banned("b")
    clock.advance(299)
    assert lim.banned("a")
    clock.advance(2)
    assert not lim.banned("a") and lim.failed("a") == 1  # ban over, count restarted
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(lim._failures) <= 100 and len(lim._banned_until) <= 100


def test_limiter_bans_an_ipv6_client_by_its_64_and_mapped_ipv4_as_ipv4() -> None:
    """Rotating through the addresses of one's own /64 must not escape the ban; another /64 and IPv4
    clients are unaffected; ::ffff:a.b.c.d is the IPv4 client a.b.c.d."""
    lim = AuthLimiter(3, window=60, ban=300, clock=FakeClock(1000.0))
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"):
        lim.failed(host)
    assert lim.banned("2001:db8:1:2::99") and lim.banned("2001:db8:1:2:abcd:ef01:2345:6789")
    assert not lim.banned("2001:db8:1:3::1"), "the next /64 is someone else"
    for _ in range(3):
        lim.failed("::ffff:192.0.2.7")
    assert lim.banned("192.0.2.7") and not lim.banned("192.0.2.8")


def test_connections_count_per_address_with_loopback_as_one_and_are_given_back_once() -> None:
    limits = LimitSettings(max_connections=3, max_connections_per_address=2)
    conns = Connections()
    first, second = conns.admit("127.0.0.1", limits, ends=10.0), conns.admit("127.0.0.2", limits, ends=10.0)
    assert isinstance(first, Admitted) and isinstance(second, Admitted) and first.ends == 10.0
    assert conns.admit("::1", limits, ends=10.0) == R.TOO_MANY_FROM_ADDRESS, "all of loopback is one address"
    third = conns.admit("192.0.2.1", limits, ends=10.0)
    assert isinstance(third, Admitted)
    assert conns.admit("192.0.2.2", limits, ends=10.0) == R.TOO_MANY_CONNECTIONS
    assert (conns.open, dict(conns.per_address)) == (3, {"loopback": 2, "192.0.2.1": 1})
    first.release()
    first.release()  # the listener releases at the end of serving and again when the connection is lost
    assert (conns.open, dict(conns.per_address)) == (2, {"loopback": 1, "192.0.2.1": 1})
    second.release()
    third.release()
    assert (conns.open, dict(conns.per_address)) == (0, {})


def test_tarpit_delay_grows_with_failures(relay_factory: RelayFactory) -> None:
    import time

    relay = relay_factory(limits={"auth_failures": {"max": 10, "delay": 0.05, "max_delay": 0.1}})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        started = time.monotonic()
        for i in range(4):
            assert c.cmd(f"AUTH PLAIN {plain_blob('erp', f'w{i}')}").startswith(b"535")
        # 0.05 + 0.1 + 0.1 + 0.1 at least
        assert time.monotonic() - started >= 0.35


def test_connection_limits_total_and_per_address(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"max_connections": 3, "max_connections_per_address": 2})
    state = relay.relay.listener_state
    a1, a2 = RawSMTP(relay.port), RawSMTP(relay.port)
    with RawSMTP(relay.port, greet=False) as a3:
        assert a3.reply().startswith(b"421 4.7.0")
        assert a3.closed()
    # All of loopback is one address: another 127/8 source gets no more slots.
    with RawSMTP(relay.port, source="127.0.0.2", greet=False) as b1:
        assert b1.reply().startswith(b"421 4.7.0 Too many connections from your address")
        assert b1.closed()
    assert state.connections.open == 2
    # The total: with a per-address limit above it, the total is what refuses.
    state.settings = state.settings.model_copy(update={"limits": state.settings.limits.model_copy(
        update={"max_connections_per_address": 10})})
    b1 = RawSMTP(relay.port, source="127.0.0.2")
    with RawSMTP(relay.port, source="127.0.0.3", greet=False) as c4:  # total reached
        assert c4.reply().startswith(b"421 4.7.0 Too many connections, try again later")
        assert c4.closed()
    assert state.connections.open == 3
    for c in (a1, a2, b1):
        c.ehlo()
        c.close()
    wait_until(lambda: state.connections.open == 0, 10, "connections to be released")
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("after limits")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_idle_timeout_says_421_and_closes(relay_factory: RelayFactory) -> None:
    relay = relay_factory(limits={"idle_timeout": 0.3})
    with RawSMTP(relay.port, timeout=10) as c:
        c.ehlo()
        assert c.reply().startswith(b"421 4.4.2")  # bounded by the socket timeout
        assert c.closed()
    wait_until(lambda: relay.relay.listener_state.connections.open == 0, 10, "connection released")


def test_data_timeout_applies_during_data(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"idle_timeout": 30, "data_timeout": 0.3})
    with RawSMTP(relay.port, timeout=10) as c:
        c.ehlo()
        c.login()
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)
        c.expect(f"RCPT TO:<{RCPT}>", 250)
        c.expect("DATA", 354)
        c.send(b"Subject: stalled\r\n\r\npartial")
        assert c.reply().startswith(b"421 4.4.2")
        assert c.closed()
    wait_until(lambda: relay.relay.listener_state.connections.open == 0, 10, "connection released")
    # The client's 250 can come before the spool records Exchange's 250 (invariant 1 allows it).
    wait_until(lambda: not relay.relay.spool.list(), 10, "the spool to record the deliveries")
    assert m365.exchange.accepted == []


@pytest.mark.parametrize("key", ["delay", "max_delay"])
def test_tarpit_settings_exist(key: str) -> None:
    from relay.config import AuthFailureSettings

    assert getattr(AuthFailureSettings(), key) > 0


def test_banned_address_refused_on_a_live_connection(relay: RelayThread) -> None:
    """A ban taken on one connection also stops AUTH on another already open from that address."""
    state = relay.relay.listener_state
    other = RawSMTP(relay.port)
    other.ehlo()
    for _ in range(state.auth_limiter.max_failures):
        state.auth_limiter.failed("127.0.0.1")
    assert other.cmd(f"AUTH PLAIN {plain_blob()}").startswith(b"421 4.7.0")
    assert other.closed()
    other.close()
