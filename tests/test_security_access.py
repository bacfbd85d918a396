"""Access: no open relay, AUTH only where it is safe, listener TLS from the admin's files.

127.0.0.2 plays a second host (the client socket binds it as its source address). For "a host that
is not this machine" the tests make the listener's loopback test answer False for 127.0.0.2, since a
test may never touch a non-loopback address.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

import relay.intake.listener
from relay.config import is_loopback_host, settings_from_dict, too_wide
from relay.errors import ConfigError
from relay.testing.harness import DEMO_PASSWORD, DEMO_USER, RelayThread, relay_config, write_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from relay.testing.smtp_client import RawSMTP, plain_blob, simple_body
from tests.conftest import RelayFactory

RCPT = "someone@fabrikam.example"
SECOND_HOST = "127.0.0.2"


def open_config(m365: SimulatedM365, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"listen": [{"address": "0.0.0.0:2525"}],
                            "accept": {"networks": ["0.0.0.0/0"], "auth": "optional"}}
    base.update(overrides)
    return relay_config(m365, tmp_path, overrides=base)


# --------------------------------------------------------------------------- open relay at startup

@pytest.mark.parametrize(("listen", "network", "auth"), [
    ("0.0.0.0:2525", "0.0.0.0/0", "optional"),
    ("0.0.0.0:2525", "0.0.0.0/0", "none"),
    ("[::]:2525", "::/0", "optional"),
    ("192.0.2.10:2525", "0.0.0.0/1", "optional"),
    ("0.0.0.0:2525", "2000::/3", "optional"),
    ("0.0.0.0:2525", "8.0.0.0/7", "optional"),
    ("0.0.0.0:2525", "::ffff:0.0.0.0/96", "optional"),
    ("relay.example.com:25", "0.0.0.0/0", "optional"),
])
def test_open_relay_configuration_refused(m365: SimulatedM365, tmp_path: Path, listen: str, network: str,
                                          auth: str) -> None:
    config = open_config(m365, tmp_path, listen=[{"address": listen}],
                         accept={"networks": ["127.0.0.1/32", network], "auth": auth})
    with pytest.raises(ConfigError) as info:
        settings_from_dict(config, "relay.yaml")
    err = info.value
    assert err.key == "accept.networks[1]"
    assert "open relay" in err.problem
    assert "accept.auth: required" in err.problem and "127.0.0.1" in err.problem  # says how to fix it


@pytest.mark.parametrize(("listen", "networks", "auth"), [
    ("127.0.0.1:2525", ["0.0.0.0/0"], "optional"),       # wide allowlist, loopback listener: reaches nobody
    ("[::1]:2525", ["::/0"], "optional"),
    ("localhost:2525", ["0.0.0.0/0"], "optional"),
    ("0.0.0.0:2525", ["0.0.0.0/0", "::/0"], "required"),  # everyone must log in
    ("0.0.0.0:2525", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"], "optional"),
    ("0.0.0.0:2525", ["198.51.100.0/24", "2001:db8:1::/48"], "optional"),  # own public ranges
    ("0.0.0.0:2525", ["203.0.113.0/16"], "none"),
])
def test_safe_configurations_start(m365: SimulatedM365, tmp_path: Path, listen: str, networks: list[str],
                                   auth: str) -> None:
    settings_from_dict(open_config(m365, tmp_path, listen=[{"address": listen}],
                                   accept={"networks": networks, "auth": auth}))


def test_rule_helpers() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert is_loopback_host("127.8.9.10") and is_loopback_host("::ffff:127.0.0.1")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("::") and not is_loopback_host("mail.example")
    assert too_wide("0.0.0.0/0") and too_wide("::/0") and too_wide("1.0.0.0/8")
    assert not too_wide("10.0.0.0/8") and not too_wide("100.64.0.0/10") and not too_wide("198.51.100.0/24")
    assert not too_wide("203.0.0.0/16") and too_wide("203.0.0.0/15")


def test_default_config_binds_loopback_only() -> None:
    from relay.config import AcceptSettings, ListenSettings

    assert ListenSettings().host == "127.0.0.1"
    assert [n.network for n in AcceptSettings().networks] == ["127.0.0.0/8", "::1"]
    assert AcceptSettings().plaintext_auth == "loopback"


def test_open_relay_daemon_exits_2_with_the_fix(m365: SimulatedM365, tmp_path: Path) -> None:
    path = write_config(open_config(m365, tmp_path), tmp_path / "relay.yaml")
    proc = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(path)], capture_output=True,
                          timeout=60, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "accept.networks[0]" in proc.stderr and "open relay" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- who may send

def test_unlisted_host_cannot_send_without_auth(relay: RelayThread, m365: SimulatedM365) -> None:
    """The allowlist is 127.0.0.1/32: 127.0.0.2 without AUTH gets nothing through."""
    with RawSMTP(relay.port, source=SECOND_HOST) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"530 5.7.0")
        assert c.cmd(f"RCPT TO:<{RCPT}>").startswith(b"503 5.5.1")
        assert c.cmd("DATA").startswith(b"503 5.5.1")
        # pipelined attempt: the body lines are answered as unknown commands, never as mail
        c.send(f"MAIL FROM:<{STANDARD_MAILBOX}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
        assert [c.reply()[:3] for _ in range(3)] == [b"530", b"503", b"503"]
        c.login()  # the same host with a password may send
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("with auth")).startswith(b"250")
    accepted = m365.exchange.wait_for_messages(1)
    assert len(accepted) == 1 and b"with auth" in accepted[0].content


def test_unlisted_host_refused_when_auth_is_off(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(accept={"networks": ["127.0.0.1/32"], "auth": "none"})
    with RawSMTP(relay.port, source=SECOND_HOST) as c:
        assert b"AUTH" not in c.ehlo()
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"550 5.7.1")
        assert c.cmd(f"AUTH PLAIN {plain_blob()}").startswith((b"503 5.5.1", b"504 5.5.4"))
    with RawSMTP(relay.port) as c:  # the allowlisted host still can
        c.ehlo()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("listed")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_auth_required_refuses_even_allowlisted(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(accept={"networks": ["127.0.0.1/32"], "auth": "required"})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"530 5.7.0")
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("required")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


@pytest.fixture
def second_host_is_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make 127.0.0.2 count as a host beyond loopback for the listener's plaintext-AUTH rule."""
    monkeypatch.setattr(relay.intake.listener, "is_loopback_host", lambda ip: ip == "127.0.0.1")


@pytest.mark.usefixtures("second_host_is_remote")
def test_plaintext_auth_only_from_loopback(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port, source=SECOND_HOST) as c:
        assert b"AUTH" not in c.ehlo()
        assert c.cmd(f"AUTH PLAIN {plain_blob()}").startswith(b"538 5.7.11")
        assert c.cmd("AUTH LOGIN").startswith(b"538 5.7.11")
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"550 5.7.1")
    with RawSMTP(relay.port) as c:
        assert b"AUTH LOGIN PLAIN" in c.ehlo()
        c.login()


@pytest.mark.usefixtures("second_host_is_remote")
def test_plaintext_auth_anywhere_when_the_admin_opts_in(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(accept={"networks": ["127.0.0.1/32"], "plaintext_auth": "anywhere"})
    with RawSMTP(relay.port, source=SECOND_HOST) as c:
        assert b"AUTH LOGIN PLAIN" in c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("opt-in")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


# --------------------------------------------------------------------------- listener TLS

@pytest.fixture(scope="module")
def listener_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path, Path]:
    """The admin's certificate for the listener: a CA of its own (not the simulator's), name localhost."""
    ca = trustme.CA(organization_name="relay listener test CA")
    leaf = ca.issue_cert("localhost")
    d = tmp_path_factory.mktemp("listener-tls")
    cert, key, ca_file = d / "cert.pem", d / "key.pem", d / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, cert, key, ca_file


def tls_relay(relay_factory: RelayFactory, listener_ca: tuple[Any, Path, Path, Path], *,
              min_version: str = "1.2", **overrides: Any) -> RelayThread:
    _, cert, key, _ = listener_ca
    return relay_factory(
        listen=[{"address": "127.0.0.1:0", "tls": "starttls"}, {"address": "127.0.0.1:0", "tls": "implicit"}],
        tls={"cert_file": str(cert), "key_file": str(key), "min_version": min_version}, **overrides)


def client_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    assert ctx.check_hostname and ctx.verify_mode is ssl.CERT_REQUIRED
    return ctx


def _message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = STANDARD_MAILBOX, RCPT, subject
    msg.set_content("over TLS\n")
    return msg


def test_starttls_and_implicit_tls_with_a_verifying_client(relay_factory: RelayFactory, m365: SimulatedM365,
                                                           listener_ca: tuple[Any, Path, Path, Path]) -> None:
    relay = tls_relay(relay_factory, listener_ca)
    starttls_port, implicit_port = relay.relay.ports
    ctx = client_context(listener_ca[3])
    with smtplib.SMTP("localhost", starttls_port, timeout=30) as client:
        client.ehlo("app.test")
        assert client.has_extn("starttls")
        client.starttls(context=ctx)
        client.ehlo("app.test")
        assert not client.has_extn("starttls")
        client.login(DEMO_USER, DEMO_PASSWORD)
        client.send_message(_message("starttls"))
    with smtplib.SMTP_SSL("localhost", implicit_port, timeout=30, context=ctx) as client:
        client.ehlo("app.test")
        assert not client.has_extn("starttls")
        client.login(DEMO_USER, DEMO_PASSWORD)
        client.send_message(_message("implicit"))

    async def with_aiosmtplib() -> None:
        await aiosmtplib.send(_message("aiosmtplib"), hostname="localhost", port=starttls_port, start_tls=True,
                              tls_context=ctx, username=DEMO_USER, password=DEMO_PASSWORD, timeout=30)

    asyncio.run(with_aiosmtplib())
    accepted = m365.exchange.wait_for_messages(3, timeout=20)
    assert sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in accepted) == [
        b"aiosmtplib", b"implicit", b"starttls"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_name_is_checked_and_old_protocols_refused(relay_factory: RelayFactory,
                                                        listener_ca: tuple[Any, Path, Path, Path]) -> None:
    relay = tls_relay(relay_factory, listener_ca)
    _, implicit_port = relay.relay.ports
    ctx = client_context(listener_ca[3])
    with pytest.raises(ssl.SSLCertVerificationError):
        RawSMTP(implicit_port, tls=ctx, server_hostname="not-the-relay.example")
    old = client_context(listener_ca[3])
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        RawSMTP(implicit_port, tls=old)
    with RawSMTP(implicit_port, tls=ctx) as c:  # still serving
        c.ehlo()
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]


def test_min_version_13(relay_factory: RelayFactory, listener_ca: tuple[Any, Path, Path, Path]) -> None:
    relay = tls_relay(relay_factory, listener_ca, min_version="1.3")
    _, implicit_port = relay.relay.ports
    tls12 = client_context(listener_ca[3])
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        RawSMTP(implicit_port, tls=tls12)
    with RawSMTP(implicit_port, tls=client_context(listener_ca[3])) as c:
        assert c.sock.version() == "TLSv1.3"  # type: ignore[attr-defined]


@pytest.mark.usefixtures("second_host_is_remote")
def test_starttls_injection_is_discarded(relay_factory: RelayFactory, m365: SimulatedM365,
                                         listener_ca: tuple[Any, Path, Path, Path]) -> None:
    """Commands sent in the same packet as STARTTLS (plaintext, injectable by a man in the middle)
    must not run inside the TLS session (CVE-2011-0411 class)."""
    relay = tls_relay(relay_factory, listener_ca)
    starttls_port, _ = relay.relay.ports
    ctx = client_context(listener_ca[3])
    with RawSMTP(starttls_port, source=SECOND_HOST) as c:
        ehlo = c.ehlo()
        assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo  # no AUTH in the clear for a remote host
        assert c.cmd(f"AUTH PLAIN {plain_blob()}").startswith(b"538 5.7.11")
        c.send(f"STARTTLS\r\nEHLO injected\r\nAUTH PLAIN {plain_blob()}\r\nMAIL FROM:<{STANDARD_MAILBOX}>\r\n"
               f"RCPT TO:<injected@evil.example>\r\nNOOP\r\n".encode())
        assert c.reply().startswith(b"220")
        assert c.buffer == b""
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        # The first reply inside TLS answers our first command there, nothing injected before it.
        assert c.cmd("NOOP").startswith(b"250")
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"503 5.5.1")  # new session: EHLO first
        ehlo = c.ehlo()
        assert b"AUTH LOGIN PLAIN" in ehlo and b"STARTTLS" not in ehlo
        assert c.cmd(f"RCPT TO:<{RCPT}>").startswith(b"503")  # the injected MAIL never happened
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("inside tls")).startswith(b"250")
    accepted = m365.exchange.wait_for_messages(1)
    assert [m.rcpt_tos for m in accepted] == [(RCPT,)]


def test_starttls_forgets_plaintext_login(relay_factory: RelayFactory,
                                          listener_ca: tuple[Any, Path, Path, Path]) -> None:
    relay = tls_relay(relay_factory, listener_ca, accept={"networks": ["127.0.0.1/32"], "auth": "required"})
    starttls_port, _ = relay.relay.ports
    ctx = client_context(listener_ca[3])
    with RawSMTP(starttls_port) as c:
        c.ehlo()
        c.login()  # plaintext from loopback: allowed
        c.expect("STARTTLS", 220)
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"530 5.7.0")  # must log in again
        c.login()
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)


def test_tls_handshake_garbage_keeps_serving(relay_factory: RelayFactory,
                                             listener_ca: tuple[Any, Path, Path, Path]) -> None:
    relay = tls_relay(relay_factory, listener_ca)
    starttls_port, implicit_port = relay.relay.ports
    with RawSMTP(starttls_port) as c:
        c.ehlo()
        c.expect("STARTTLS", 220)
        c.send(b"\x16\x03\x01\x00\x05garbage-not-a-client-hello\r\n")
        assert c.closed()
    with RawSMTP(implicit_port, greet=False) as c:
        c.send(b"EHLO plaintext-on-tls-port\r\n")
        assert c.closed()
    with RawSMTP(implicit_port, tls=client_context(listener_ca[3])) as c:
        c.ehlo()
        c.login()


def _swaks_support() -> str:
    if shutil.which("swaks") is None:
        return ""
    proc = subprocess.run(["swaks", "--support"], capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr


SWAKS = _swaks_support()
SMUGGLING_BODY = "line one\n.\nMAIL FROM:<x@evil.example>\nRCPT TO:<y@evil.example>\n"


def _swaks(port: int, *extra: str, server: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", server, "--helo", "app.test", "--port", str(port),
         "--auth", "PLAIN", "--auth-user", DEMO_USER,
         "--auth-password", DEMO_PASSWORD, "--from", STANDARD_MAILBOX, "--to", RCPT,
         "--header", "Subject: swaks", "--body", SMUGGLING_BODY, *extra],
        capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not SWAKS, reason="swaks is not installed (.ci/run installs it)")
def test_swaks_plain_auth_and_a_smuggling_body(relay: RelayThread, m365: SimulatedM365) -> None:
    proc = _swaks(relay.port)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (accepted,) = m365.exchange.wait_for_messages(1)
    assert accepted.rcpt_tos == (RCPT,)
    assert b"y@evil.example" in accepted.content  # content, not a second transaction


@pytest.mark.skipif("=== TLS supported" not in SWAKS, reason="swaks without TLS support (needs Net::SSLeay)")
def test_swaks_starttls_verifying_localhost(relay_factory: RelayFactory, m365: SimulatedM365,
                                            listener_ca: tuple[Any, Path, Path, Path]) -> None:
    relay = tls_relay(relay_factory, listener_ca)
    starttls_port, _ = relay.relay.ports
    proc = _swaks(starttls_port, "--tls", "--tls-verify", "--tls-ca-path", str(listener_ca[3]), server="localhost")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (accepted,) = m365.exchange.wait_for_messages(1)
    assert accepted.rcpt_tos == (RCPT,)
