"""The foundation: a legacy app's mail relayed to (simulated) Exchange Online with XOAUTH2, end to end.

Real smtplib clients talk to the real relay on 127.0.0.1; the relay talks STARTTLS + XOAUTH2 to the
simulated Exchange and HTTPS to the simulated Entra ID through the real MSAL.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from relay.microsoft.upstream import xoauth2_initial_response
from relay.testing.harness import DEMO_PASSWORD, DEMO_USER, RelayThread, wait_until
from relay.testing.m365 import (
    STANDARD_CLIENT_ID,
    STANDARD_MAILBOX,
    STANDARD_SEND_AS,
    STANDARD_TENANT,
    SimulatedM365,
)
from tests.conftest import RelayFactory

VECTORS = [
    ("test@contoso.onmicrosoft.com", "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
     "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0N"
     "jbFJDM0VvQUEBAQ=="),
    ("user", "mF_9.B5f-4.1JqM", "dXNlcj11c2VyAWF1dGg9QmVhcmVyIG1GXzkuQjVmLTQuMUpxTQEB"),
]


def message(sender: str = STANDARD_MAILBOX, to: str = "someone@fabrikam.example", body: str = "Hello.\n",
            subject: str = "Test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="app.test")
    msg.set_content(body)
    return msg


def send_raw(port: int, raw: bytes, rcpts: list[str], *, sender: str = STANDARD_MAILBOX, mech: str | None = "plain",
             mail_options: tuple[str, ...] = ()) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("app.test")
        if mech:
            client.user, client.password = DEMO_USER, DEMO_PASSWORD
            client.auth(mech, client.auth_plain if mech == "plain" else client.auth_login)
        code, resp = client.mail(sender, list(mail_options))
        assert code == 250, resp
        for r in rcpts:
            code, resp = client.rcpt(r)
            assert code == 250, resp
        return client.data(raw)


@pytest.mark.parametrize(("user", "token", "expected"), VECTORS)
def test_xoauth2_initial_response_matches_exchange_vectors(user: str, token: str, expected: str) -> None:
    assert xoauth2_initial_response(user, token) == expected


@pytest.mark.parametrize("mech", ["plain", "login"])
def test_auth_plain_and_login_relay_bytes_unchanged_with_bcc(relay: RelayThread, m365: SimulatedM365,
                                                             mech: str) -> None:
    msg = message(subject=f"via AUTH {mech}")
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    rcpts = ["to@fabrikam.example", "cc@fabrikam.example", "hidden-bcc@contoso.com"]
    code, resp = send_raw(relay.port, raw, rcpts, mech=mech)
    assert code == 250, resp
    assert b"delivered as" in resp
    [accepted] = m365.exchange.accepted
    assert accepted.content == raw
    assert accepted.rcpt_tos == tuple(rcpts)  # the Bcc recipient is only in the envelope, and arrives
    assert accepted.mailbox == STANDARD_MAILBOX
    assert accepted.mail_from == STANDARD_MAILBOX
    assert accepted.eml_path.read_bytes() == raw


def test_dot_lines_8bit_and_smtputf8_arrive_identical(relay: RelayThread, m365: SimulatedM365) -> None:
    dotted = (b"From: relay@contoso.com\r\nTo: x@fabrikam.example\r\nSubject: dots\r\n\r\n"
              b".leading dot\r\n..two dots\r\n.\r\n. \r\nlast\r\n")
    code, _ = send_raw(relay.port, dotted, ["x@fabrikam.example"])
    assert code == 250
    eight_bit = ("From: relay@contoso.com\r\nTo: x@fabrikam.example\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
                 "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln, 東京, Zürich\r\n").encode()
    code, _ = send_raw(relay.port, eight_bit, ["x@fabrikam.example"], mail_options=("BODY=8BITMIME",))
    assert code == 250
    utf8 = ("From: relay@contoso.com\r\nTo: jürgen@bücher.example\r\nSubject: Ünïcödé\r\n\r\n"
            "SMTPUTF8 all the way: ☃\r\n").encode()
    code, _ = send_raw(relay.port, utf8, ["jürgen@bücher.example"], mail_options=("SMTPUTF8", "BODY=8BITMIME"))
    assert code == 250
    got = m365.exchange.accepted
    assert [a.content for a in got] == [dotted, eight_bit, utf8]
    assert got[2].rcpt_tos == ("jürgen@bücher.example",)
    assert "SMTPUTF8" in got[2].mail_options


def test_ten_megabyte_attachment(relay: RelayThread, m365: SimulatedM365) -> None:
    msg = message(subject="big")
    payload = os.urandom(10 * 1024 * 1024)
    msg.add_attachment(payload, maintype="application", subtype="octet-stream", filename="big.bin")
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    code, resp = send_raw(relay.port, raw, ["x@fabrikam.example"])
    assert code == 250, resp
    [accepted] = m365.exchange.accepted
    assert accepted.content == raw


def test_xoauth2_on_the_wire_is_the_documented_form(relay: RelayThread, m365: SimulatedM365) -> None:
    send_raw(relay.port, message().as_bytes(), ["x@fabrikam.example"])
    attempts = m365.exchange.auth_attempts
    assert attempts, "the simulated Exchange saw no AUTH"
    attempt = attempts[-1]
    decoded = base64.b64decode(attempt.raw)
    user, auth, *_ = decoded.split(b"\x01")
    assert user == f"user={STANDARD_MAILBOX}".encode()
    assert auth.startswith(b"auth=Bearer ")
    token = auth.removeprefix(b"auth=Bearer ").decode()
    assert attempt.raw == xoauth2_initial_response(STANDARD_MAILBOX, token)
    assert decoded.endswith(b"\x01\x01")


def test_200_messages_over_20_connections_one_token_request(relay_factory: RelayFactory,
                                                            m365: SimulatedM365) -> None:
    m365.exchange.limits.messages_per_minute = 10_000  # this test is about tokens, not pacing
    relay = relay_factory(delivery={"per_mailbox": {"connections": 3, "per_minute": 0}})
    def client(n: int) -> int:
        ok = 0
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as c:
            c.login(DEMO_USER, DEMO_PASSWORD)
            for i in range(10):
                msg = message(subject=f"conn {n} msg {i}")
                c.send_message(msg)
                ok += 1
        return ok

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        sent = sum(pool.map(client, range(20)))
    assert sent == 200
    wait_until(lambda: len(m365.exchange.accepted) == 200, 60, "200 messages at Exchange")
    assert m365.entra.token_requests == 1


def test_certificate_credential(m365: SimulatedM365, relay_factory: RelayFactory, tmp_path: Path) -> None:
    from relay.testing.certs import make_app_certificate

    cert = make_app_certificate("oauth-smtp-relay test")
    m365.entra.add_certificate(STANDARD_TENANT, STANDARD_CLIENT_ID, cert)
    key = tmp_path / "app-key.pem"
    key.write_bytes(cert.private_key_pem)
    app = dict(relay_config_app(m365))
    del app["client_secret"]
    app["certificate"] = {"private_key_file": str(key), "thumbprint": cert.thumbprint_sha1_hex}
    relay = relay_factory(apps=[app])
    code, resp = send_raw(relay.port, message().as_bytes(), ["x@fabrikam.example"])
    assert code == 250, resp
    assert len(m365.exchange.accepted) == 1
    grant = [r for r in m365.entra.requests if r.path.endswith("/token")][-1]
    assert grant.credential == "assertion"


def relay_config_app(m365: SimulatedM365) -> dict[str, object]:
    from relay.testing.harness import relay_config

    app: dict[str, object] = relay_config(m365, Path("/nonexistent"))["apps"][0]
    return app


def test_wrong_password_gets_535_578(relay: RelayThread, m365: SimulatedM365) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        c.login(DEMO_USER, "not-the-password")
    assert err.value.smtp_code == 535
    assert isinstance(err.value.smtp_error, bytes) and err.value.smtp_error.startswith(b"5.7.8")


def test_no_auth_from_non_allowlisted_address_is_refused(relay: RelayThread, m365: SimulatedM365) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30, source_address=("127.0.0.2", 0)) as c:
        c.ehlo("printer.test")
        code, resp = c.mail(STANDARD_MAILBOX)
        assert code == 530
        assert resp.startswith(b"5.7.0")
        code, _ = c.rcpt("x@fabrikam.example")
        assert code == 503
    assert m365.exchange.stats().connections == 0
    assert m365.exchange.accepted == []


def test_sendas_refused_by_exchange_is_passed_back(relay: RelayThread, m365: SimulatedM365) -> None:
    m365.revoke_send_as(STANDARD_SEND_AS, STANDARD_CLIENT_ID)
    msg = message(sender=STANDARD_SEND_AS)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
        c.login(DEMO_USER, DEMO_PASSWORD)
        with pytest.raises(smtplib.SMTPResponseException) as err:
            c.send_message(msg)
    assert err.value.smtp_code == 550
    assert b"5.7.60" in err.value.smtp_error
    assert m365.exchange.accepted == []
    spool = relay.relay.spool
    assert spool.list() == [], "a permanent refusal passed back in sync mode keeps nothing"


def test_token_endpoint_down_queues_then_delivers(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    """Store and forward, not a synchronous 4xx: the client gets 250 queued, never a 5xx,
    and the message goes out once Entra ID is back."""
    m365.entra.set_down(True)
    relay = relay_factory(delivery={"sync_wait": 5, "retry": {"first": 0.2, "max": 0.5}})
    code, resp = send_raw(relay.port, message().as_bytes(), ["x@fabrikam.example"])
    assert code == 250 and b"queued as" in resp, resp
    assert m365.exchange.accepted == []
    m365.entra.set_down(False)
    wait_until(lambda: len(m365.exchange.accepted) == 1, 60, "delivery after the token endpoint came back")


INVALID_CONFIGS = [
    ("unknown key", "apps:\n  - name: a\n    tenant_id: 11111111-1111-1111-1111-111111111111\n"
     "    client_id: 22222222-2222-2222-2222-222222222222\n    client_secret: s\n    colour: blue\n"
     "mailboxes: [{address: a@b.com, app: a}]\n", "apps[0].colour"),
    ("missing tenant", "apps:\n  - name: a\n    client_id: 22222222-2222-2222-2222-222222222222\n"
     "    client_secret: s\nmailboxes: [{address: a@b.com, app: a}]\n", "apps[0].tenant_id"),
    ("placeholder", "apps:\n  - name: a\n    tenant_id: <TENANT_ID>\n"
     "    client_id: 22222222-2222-2222-2222-222222222222\n    client_secret: s\n"
     "mailboxes: [{address: a@b.com, app: a}]\n", "apps[0].tenant_id"),
    ("unreadable secret file", "apps:\n  - name: a\n    tenant_id: 11111111-1111-1111-1111-111111111111\n"
     "    client_id: 22222222-2222-2222-2222-222222222222\n    client_secret_file: /nonexistent/secret\n"
     "mailboxes: [{address: a@b.com, app: a}]\n", "apps[0].client_secret_file"),
]


@pytest.mark.parametrize(("label", "text", "key"), INVALID_CONFIGS, ids=[c[0] for c in INVALID_CONFIGS])
def test_invalid_config_exits_2_naming_the_key(tmp_path: Path, label: str, text: str, key: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    for command in (["check", "--offline"], ["serve"]):
        proc = subprocess.run([sys.executable, "-m", "relay", *command, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert key in proc.stderr + proc.stdout, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_example_config_is_refused_until_placeholders_are_replaced(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "--offline", "-c", str(example)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "placeholder" in proc.stdout + proc.stderr


def test_demo_runs_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-m", "relay", "demo", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: 3 message(s) relayed" in proc.stdout
    assert "token requests to Entra ID: 1" in proc.stdout
    delivered = list((tmp_path / "demo" / "m365" / "exchange-out").glob("*.eml"))
    assert len(delivered) == 3


def test_example_config_validates_once_placeholders_are_filled(tmp_path: Path) -> None:
    example = (Path(__file__).resolve().parent.parent / "config.example.yaml").read_text()
    filled = (example.replace("<TENANT_ID>", "11111111-1111-1111-1111-111111111111")
              .replace("<CLIENT_ID>", "22222222-2222-2222-2222-222222222222")
              .replace("<MAILBOX>", "noreply@contoso.com")
              .replace("/run/secrets/client_secret", str(tmp_path / "secret")))
    (tmp_path / "secret").write_text("a-secret-value\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(filled)
    from relay.config import load_settings

    settings = load_settings(cfg)
    assert settings.apps[0].client_secret is not None
    assert settings.apps[0].client_secret.get_secret_value() == "a-secret-value"
    assert settings.limits.max_message_size == 35 * 1024 * 1024
