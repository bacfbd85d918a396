"""Hostile clients against limits: brute force by person, session slots, UTF-8 without SMTPUTF8, AUTH
mechanism names, the health server and reload safety. Real sockets on loopback, bounded waits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import relay.intake.auth
from relay.config import settings_from_dict
from relay.intake import passwords
from relay.intake.limits import AuthLimiter
from relay.intake.listener import RelayHandler, RelaySMTP
from relay.observability import HEALTH_MAX_CONNECTIONS, HealthServer, Metrics
from relay.service import ReloadRefused
from relay.testing.harness import DEMO_PASSWORD, DEMO_USER, RelayThread, relay_config, wait_until, write_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from relay.testing.smtp_client import RawSMTP, plain_blob, simple_body
from tests.conftest import RelayFactory
from tests.fakeclock import FakeClock

RCPT = "someone@fabrikam.example"


# ---- AUTH mechanism names ------------------------------------------------------------------------

def test_only_mechanisms_are_named_auth_() -> None:
    """aiosmtpd takes every ``auth_*`` attribute of the protocol and the handler for a mechanism."""
    names = {n for cls in (RelaySMTP, RelayHandler) for n in dir(cls) if n.startswith("auth_")}
    assert names == {"auth_PLAIN", "auth_LOGIN"}


def test_ehlo_lists_exactly_plain_and_login(relay: RelayThread) -> None:
    with RawSMTP(relay.port) as c:
        lines = c.ehlo().split(b"\r\n")
        auth = [line for line in lines if line[4:].startswith(b"AUTH")]
        assert len(auth) == 1
        assert sorted(auth[0][4:].split()[1:]) == [b"LOGIN", b"PLAIN"]


@pytest.mark.parametrize("mechanism", ["OFFERED", "offered", "CRAM-MD5"])
def test_unknown_mechanism_gets_504(relay: RelayThread, mechanism: str) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd(f"AUTH {mechanism}").startswith(b"504 5.5.4")
        c.login()  # the session is still usable


# ---- UTF-8 addresses without SMTPUTF8 --------------------------------------------------------------

def test_utf8_recipient_without_smtputf8_is_refused_at_rcpt(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)
        assert c.cmd("RCPT TO:<jürgen@fabrikam.example>".encode()).startswith(b"553 5.6.7")
        assert c.cmd("RCPT TO:<用户@例子.example>".encode()).startswith(b"553 5.6.7")
        # an ASCII recipient in the same transaction is fine, and the message goes out to it alone
        c.expect(f"RCPT TO:<{RCPT}>", 250)
        c.expect("DATA", 354)
        c.send(b"From: relay@contoso.com\r\nTo: someone@fabrikam.example\r\nSubject: ascii\r\n\r\nHi\r\n.\r\n")
        assert c.reply().startswith(b"250")
    messages = m365.exchange.wait_for_messages(1)
    assert [m.rcpt_tos for m in messages] == [(RCPT,)]


def test_utf8_sender_without_smtputf8_is_refused_at_mail(relay: RelayThread) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        assert c.cmd("MAIL FROM:<relé@contoso.com>".encode()).startswith(b"553 5.6.7")
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)  # the session stays usable


def test_utf8_recipient_with_smtputf8_is_not_refused_for_its_encoding(relay: RelayThread) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}> SMTPUTF8", 250)
        assert not c.cmd("RCPT TO:<jürgen@fabrikam.example>".encode()).startswith(b"553")


# ---- brute force by person, not by socket -----------------------------------------------------------

FAST_TARPIT = {"delay": 0.001, "max_delay": 0.005}


class Checks:
    """Counts the password checks the relay really runs (wrapping verify_password); ``gate``, when
    cleared, holds every check until the test sets it (bounded)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Checks]:
    real = passwords.verify_password  # relay.intake.auth calls it under this name
    c = Checks()

    def counted(password: str, hashed: str) -> bool:
        with c.lock:
            c.count += 1
            c.waiting += 1
        try:
            assert c.gate.wait(30), "the test never released the password checks"
            return real(password, hashed)
        finally:
            with c.lock:
                c.waiting -= 1

    monkeypatch.setattr(relay.intake.auth, "verify_password", counted)
    yield c
    c.gate.set()


def _guess(source: str, port: int, guesses: int, replies: list[bytes], lock: threading.Lock) -> None:
    """One client address: EHLO, then wrong passwords until refused with 421 or closed."""
    try:
        with RawSMTP(port, source=source, greet=False) as c:
            greeting = c.reply()
            if not greeting.startswith(b"220"):
                with lock:
                    replies.append(greeting)
                return
            c.ehlo()
            for i in range(guesses):
                reply = c.cmd(f"AUTH PLAIN {plain_blob(DEMO_USER, f'{source}-guess-{i}')}")
                with lock:
                    replies.append(reply)
                if not reply.startswith(b"535"):
                    return
    except ConnectionError:
        return


def test_rotating_loopback_addresses_get_one_budget(relay_factory: RelayFactory, m365: SimulatedM365,
                                                     checks: Checks) -> None:
    """40 loopback source addresses x 9 wrong guesses, all at once: at most ``max`` passwords are
    checked in the window, then every loopback client is refused; the real user too, until the ban
    ends, and then the real user logs in and sends."""
    relay = relay_factory(limits={"auth_failures": {"max": 10, "window": 600, "ban": 900, **FAST_TARPIT}})
    replies: list[bytes] = []
    lock = threading.Lock()
    sources = [f"127.0.{i // 200}.{i % 200 + 2}" for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:
        for future in [pool.submit(_guess, s, relay.port, 9, replies, lock) for s in sources]:
            future.result(60)
    assert checks.count <= 10, f"{checks.count} passwords checked for 10 allowed"
    assert sum(r.startswith(b"535") for r in replies) <= 9
    assert any(r.startswith(b"421 4.7.0") for r in replies)
    # The real user, from any loopback address, is refused while the ban lasts (documented).
    for source in ("127.0.0.1", "127.9.9.9"):
        with RawSMTP(relay.port, source=source, greet=False) as c:
            assert c.reply().startswith(b"421 4.7.0")
            assert c.closed()
    assert checks.count <= 10
    # When the ban is over, the real user logs in and sends as usual.
    limiter = relay.relay.listener_state.auth_limiter
    limiter._clock = FakeClock(limiter._clock() + 901)
    with RawSMTP(relay.port, source="127.0.0.1") as c:
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("after the ban")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_parallel_burst_is_counted_before_it_is_checked(relay_factory: RelayFactory, checks: Checks) -> None:
    """40 AUTHs sent at once from one address: only ``max`` reach the password check; the others wait
    for those checks and, as they fail, are refused (421 4.7.0) unchecked: the right password too."""
    relay = relay_factory(limits={"auth_failures": {"max": 10, **FAST_TARPIT}})
    limiter = relay.relay.listener_state.auth_limiter
    checks.gate.clear()  # hold every password check until all AUTHs are in
    clients = [RawSMTP(relay.port, source=f"127.0.1.{i + 1}") for i in range(40)]
    try:
        for c in clients:
            c.ehlo()
        for i, c in enumerate(clients[:39]):
            c.send(f"AUTH PLAIN {plain_blob(DEMO_USER, f'wrong-{i}')}\r\n".encode())
        wait_until(lambda: limiter.waiting == 29, 30, "the AUTHs over the budget to wait")
        clients[39].send(f"AUTH PLAIN {plain_blob(DEMO_USER, DEMO_PASSWORD)}\r\n".encode())
        wait_until(lambda: limiter.waiting == 30, 30, "the right password to wait too")
        assert checks.count <= 10
        checks.gate.set()
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            replies = list(pool.map(lambda c: c.reply(), clients))
        assert checks.count == 10
        assert replies[39].startswith(b"421 4.7.0"), "refused without a check"
        codes = sorted(r[:3] for r in replies[:39])
        # 29 refused unchecked; of the 10 checked, the 10th failure bans (and the ones still in the
        # tarpit when it does are refused with 421 too)
        assert set(codes) <= {b"421", b"535"} and codes.count(b"421") >= 30
    finally:
        for c in clients:
            c.close()


def test_parallel_logins_of_real_apps_all_get_in(relay_factory: RelayFactory, m365: SimulatedM365,
                                                 checks: Checks) -> None:
    """16 apps logging in at once with the right password (more than ``max``): the ones over the
    budget wait for the checks before them and get in; nothing is refused."""
    relay = relay_factory(limits={"auth_failures": {"max": 3, **FAST_TARPIT}})
    limiter = relay.relay.listener_state.auth_limiter
    checks.gate.clear()
    clients = [RawSMTP(relay.port, source=f"127.0.3.{i + 1}") for i in range(16)]
    try:
        for c in clients:
            c.ehlo()
            c.send(f"AUTH PLAIN {plain_blob()}\r\n".encode())
        wait_until(lambda: limiter.waiting == 13, 30, "the logins over the budget to wait")
        checks.gate.set()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda c: c.reply(), clients))
        assert all(r.startswith(b"235") for r in replies), replies
        assert clients[0].send_mail(STANDARD_MAILBOX, [RCPT], simple_body("after a login burst")).startswith(b"250")
    finally:
        for c in clients:
            c.close()
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_a_success_does_not_reset_failures(relay_factory: RelayFactory) -> None:
    """Failures stay counted for their window whoever logs in afterwards (the guessed user's own app
    included): 2 failures, a success, 1 more failure reach max 3 and ban."""
    relay = relay_factory(limits={"auth_failures": {"max": 3, **FAST_TARPIT}})
    with RawSMTP(relay.port, source="127.0.0.5") as c:
        c.ehlo()
        assert c.cmd(f"AUTH PLAIN {plain_blob('admin', 'guess1')}").startswith(b"535")
        assert c.cmd(f"AUTH PLAIN {plain_blob(DEMO_USER, 'guess2')}").startswith(b"535")
    with RawSMTP(relay.port, source="127.0.0.1") as c:
        c.ehlo()
        c.login()
    with RawSMTP(relay.port, source="127.0.0.6") as c:
        c.ehlo()
        assert c.cmd(f"AUTH PLAIN {plain_blob(DEMO_USER, 'guess3')}").startswith(b"421 4.7.0")
        assert c.closed()


def test_limiter_keys_loopback_as_one_client() -> None:
    lim = AuthLimiter(3, window=60, ban=300, clock=FakeClock(1000.0))
    for host in ("127.0.0.1", "::1", "::ffff:127.3.2.1"):
        lim.failed(host)
    assert lim.banned("127.200.1.1") and lim.banned("::1") and lim.banned("::ffff:127.0.0.1")
    assert not lim.banned("192.0.2.1") and not lim.banned("2001:db8::1")


def test_limiter_reserves_before_checking() -> None:
    asyncio.run(_reserves_before_checking())


async def _reserves_before_checking() -> None:
    clock = FakeClock(1000.0)
    lim = AuthLimiter(3, window=60, ban=300, clock=clock)
    pending = [await lim.begin("192.0.2.1") for _ in range(3)]
    a, b, c = pending
    assert a is not None and b is not None and c is not None
    fourth = asyncio.ensure_future(lim.begin("192.0.2.1"))
    await asyncio.sleep(0)  # let it run up to its wait (a scheduling step, not a timing guess)
    assert not fourth.done() and lim.waiting == 1, "the budget is held by checks still running"
    assert await lim.begin("192.0.2.2") is not None, "another client is not affected"
    lim.succeed(a)  # a success gives back its own slot only: the waiting check goes on
    again = await asyncio.wait_for(fourth, 5)
    assert again is not None
    assert lim.fail(b) == 1 and lim.fail(c) == 2
    assert not lim.banned("192.0.2.1"), "a check still running holds a slot but does not ban"
    fifth = asyncio.ensure_future(lim.begin("192.0.2.1"))
    await asyncio.sleep(0)
    assert lim.fail(again) == 3
    assert lim.banned("192.0.2.1") and await asyncio.wait_for(fifth, 5) is None
    clock.advance(301)
    assert not lim.banned("192.0.2.1") and await lim.begin("192.0.2.1") is not None


# ---- connection slots -------------------------------------------------------------------------------

def test_noop_every_few_seconds_does_not_keep_a_session_forever(relay_factory: RelayFactory,
                                                                m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"max_session": "1h"})
    state = relay.relay.listener_state
    clock = FakeClock(1000.0)
    state.clock = clock
    with RawSMTP(relay.port) as c:
        c.ehlo()
        for _ in range(5):
            clock.advance(600)  # ten minutes between NOOPs: never idle long enough for idle_timeout
            c.expect("NOOP", 250)
        clock.advance(601)  # 1 h 0 min 1 s
        assert c.cmd("NOOP").startswith(b"421 4.4.2")
        assert c.closed()
    wait_until(lambda: state.connections.open == 0, 10, "the slot to be released")
    # A new connection has its own hour.
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("new session")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_a_silent_session_is_closed_after_max_session_plus_data_timeout(relay_factory: RelayFactory) -> None:
    """The hard stop: a client that says nothing (idle_timeout far away) is still closed, with 421."""
    relay = relay_factory(limits={"max_session": 0.2, "data_timeout": 0.3, "idle_timeout": 60})
    with RawSMTP(relay.port, timeout=10) as c:
        c.ehlo()
        assert c.reply() == b"421 4.4.2 Session time limit reached, closing connection"  # bounded: 10 s
        assert c.closed()
    wait_until(lambda: relay.relay.listener_state.connections.open == 0, 10, "the slot to be released")


def test_loopback_sources_share_the_per_address_slots(relay_factory: RelayFactory) -> None:
    relay = relay_factory(limits={"max_connections_per_address": 3})
    held = [RawSMTP(relay.port, source=f"127.0.2.{i + 1}") for i in range(3)]
    try:
        with RawSMTP(relay.port, source="127.0.2.200", greet=False) as c:
            assert c.reply().startswith(b"421 4.7.0 Too many connections from your address")
            assert c.closed()
    finally:
        for c in held:
            c.close()
    wait_until(lambda: relay.relay.listener_state.connections.open == 0, 10, "the slots to be released")
    with RawSMTP(relay.port, source="127.0.2.200") as c:
        c.ehlo()


# ---- the metrics/health HTTP server ---------------------------------------------------------------

def _http_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_health_server_caps_connections_and_times_out_silent_clients() -> None:
    server = HealthServer("127.0.0.1", 0, Metrics(), lambda: (True, {}), request_timeout=1.0)
    server.start()
    silent: list[socket.socket] = []
    try:
        assert HEALTH_MAX_CONNECTIONS == 16
        for _ in range(HEALTH_MAX_CONNECTIONS):
            silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        silent[0].sendall(b"GET /metr")  # half a request line: no better than nothing
        # Every slot is taken: one more connection is closed at once, unanswered.
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert _closed_by_server(extra)
        assert time.monotonic() - started < 1.0
        # The silent ones are closed by the server after the request timeout (bounded by 10 s each).
        for s in silent:
            assert _closed_by_server(s)
        assert time.monotonic() - started < 5.0
        # and the slots come back.
        answers: list[tuple[int, bytes]] = []

        def served() -> bool:
            with contextlib.suppress(OSError, IndexError, ValueError):
                answers.append(_http_get(server.port, "/healthz"))
            return bool(answers) and answers[-1] == (200, b"ok\n")

        wait_until(served, 10, "the health server to answer again")
    finally:
        for s in silent:
            s.close()
        server.stop()


def test_health_server_closes_a_dribbling_client_at_the_request_timeout() -> None:
    """A byte every 0.2 s never trips a per-read timeout; the whole-connection deadline still ends it."""
    server = HealthServer("127.0.0.1", 0, Metrics(), lambda: (True, {}), request_timeout=1.0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=0.2) as s:
            started = time.monotonic()
            closed = False
            for byte in b"GET /healthz HTTP/1.0\r\nX-Pad: " + b"a" * 200:
                try:
                    s.sendall(bytes([byte]))
                    closed = s.recv(1) == b""  # waits at most 0.2 s for the server to close
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                break
            assert closed
            assert 0.9 <= time.monotonic() - started < 5
    finally:
        server.stop()


# ---- reload safety ----------------------------------------------------------------------------------

def test_reload_that_would_open_the_running_listeners_is_refused(
        relay_factory: RelayFactory, m365: SimulatedM365, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Running on 0.0.0.0 with a narrow allowlist; the new file says listen on loopback (needs a
    restart, so the old socket stays) and allowlists 0.0.0.0/0: valid alone, an open relay for the
    running listener. Refused; the old networks keep working and the session in flight completes."""
    relay = relay_factory(listen=[{"address": "0.0.0.0:0", "tls": "none"}],
                          accept={"networks": ["127.0.0.1/32"], "auth": "optional"})
    wide = settings_from_dict(relay_config(m365, tmp_path, overrides={
        "listen": [{"address": "127.0.0.1:0", "tls": "none"}],
        "accept": {"networks": ["127.0.0.1/32", "0.0.0.0/0"], "auth": "optional"}}))
    with RawSMTP(relay.port, source="127.0.0.1") as inflight:
        inflight.ehlo()
        inflight.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)  # by the allowlist, no AUTH
        inflight.expect(f"RCPT TO:<{RCPT}>", 250)
        with pytest.raises(ReloadRefused) as refused:
            relay.call(relay.relay.reload(wide))
        assert refused.value.key == "accept.networks[1]"
        assert "0.0.0.0:" in str(refused.value) and "restart" in str(refused.value)
        inflight.expect("DATA", 354)
        inflight.send(b"From: relay@contoso.com\r\nTo: someone@fabrikam.example\r\nSubject: in flight\r\n\r\n"
                      b"Hi\r\n.\r\n")
        assert inflight.reply().startswith(b"250")
    assert [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "reload_refused"]
    registry = relay.relay.metrics.registry
    assert registry.get_sample_value("relay_reload_total", {"result": "refused"}) == 1
    assert not registry.get_sample_value("relay_reload_total", {"result": "applied"})
    # The running configuration stays: 127.0.0.1 still sends without AUTH, 127.0.0.2 (in the refused
    # 0.0.0.0/0) still must log in.
    assert relay.relay.settings.accept.networks[0].network == "127.0.0.1/32"
    assert len(relay.relay.settings.accept.networks) == 1
    with RawSMTP(relay.port, source="127.0.0.2") as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"530 5.7.0")
    with RawSMTP(relay.port, source="127.0.0.1") as c:
        c.ehlo()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("after the refused reload")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(2)) == 2


def test_reload_with_a_narrow_allowlist_is_applied_on_a_public_listener(
        relay_factory: RelayFactory, m365: SimulatedM365, tmp_path: Path) -> None:
    relay = relay_factory(listen=[{"address": "0.0.0.0:0", "tls": "none"}],
                          accept={"networks": ["127.0.0.1/32"], "auth": "optional"})
    narrow = settings_from_dict(relay_config(m365, tmp_path, overrides={
        "listen": [{"address": "0.0.0.0:0", "tls": "none"}],
        "accept": {"networks": ["127.0.0.1/32", "127.0.0.2/32"], "auth": "optional"}}))
    relay.call(relay.relay.reload(narrow))
    assert relay.relay.metrics.registry.get_sample_value("relay_reload_total", {"result": "applied"}) == 1
    with RawSMTP(relay.port, source="127.0.0.2") as c:
        c.ehlo()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("newly allowed")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_sighup_reload_of_an_open_relay_file_keeps_running(relay_factory: RelayFactory, m365: SimulatedM365,
                                                            tmp_path: Path) -> None:
    """The SIGHUP path (file on disk): refused, counted, nothing raised into the event loop."""
    relay = relay_factory(listen=[{"address": "0.0.0.0:0", "tls": "none"}],
                          accept={"networks": ["127.0.0.1/32"], "auth": "optional"})
    path = write_config(relay_config(m365, tmp_path, overrides={
        "accept": {"networks": ["0.0.0.0/0"], "auth": "optional"}}), tmp_path / "relay.yaml")
    relay.relay.config_path = str(path)
    relay.call(relay.relay._safe_reload())
    registry = relay.relay.metrics.registry
    assert registry.get_sample_value("relay_reload_total", {"result": "refused"}) == 1
    assert [n.network for n in relay.relay.settings.accept.networks] == ["127.0.0.1/32"]
    path.write_text("listen: [")  # not YAML: counted as invalid
    relay.call(relay.relay._safe_reload())
    assert registry.get_sample_value("relay_reload_total", {"result": "invalid"}) == 1


def test_help_still_lists_the_commands(relay: RelayThread) -> None:
    """The session limit wraps every command; HELP still finds their syntax."""
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert set(c.cmd("HELP").split()[3:]) == {b"AUTH", b"DATA", b"EHLO", b"HELO", b"HELP", b"MAIL", b"NOOP",
                                                 b"QUIT", b"RCPT", b"RSET", b"VRFY"}
        assert c.cmd("HELP MAIL").startswith(b"250 Syntax: MAIL FROM: <address>")
        assert c.cmd("HELP DATA").startswith(b"250 Syntax: DATA")


def test_failed_logins_are_counted_in_the_metrics(relay_factory: RelayFactory) -> None:
    relay = relay_factory(limits={"auth_failures": {"max": 10, **FAST_TARPIT}})

    def counted() -> float:
        for line in relay.relay.metrics.render().decode().splitlines():
            if line.startswith("relay_client_auth_failures_total "):
                return float(line.split()[1])
        raise AssertionError("relay_client_auth_failures_total is not exported")

    assert counted() == 0
    with RawSMTP(relay.port) as c:
        c.ehlo()
        for _ in range(3):
            assert c.cmd(f"AUTH PLAIN {plain_blob(DEMO_USER, 'wrong')}").startswith(b"535 5.7.8")
        c.login()
    assert counted() == 3
