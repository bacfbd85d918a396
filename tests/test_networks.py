"""Company networks: an HTTPS proxy for Entra ID, custom CA bundles, several tenants in one relay."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.testing.harness import RelayThread, free_port, relay_config, wait_for_port, wait_until
from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_MAILBOX, STANDARD_SECRET, STANDARD_TENANT, SimulatedM365
from tests.conftest import RelayFactory

TENANT_B = "33333333-3333-3333-3333-333333333333"
CLIENT_B = "44444444-4444-4444-4444-444444444444"
SECRET_B = "fabrikam~secret-value.0123456789"
MAILBOX_B = "ops@fabrikam.com"


def _send(port: int, sender: str, subject: str) -> tuple[int, bytes]:
    raw = f"From: {sender}\r\nTo: x@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("app.test")
        c.mail(sender)
        c.rcpt("x@example.org")
        return c.data(raw)


class TinyProxy:
    """A real forward proxy (Debian's tinyproxy) on loopback, started and stopped by the test."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o777)
        self.log = workdir / "tinyproxy.log"
        self.conf = workdir / "tinyproxy.conf"
        self.conf.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nLogLevel Info\n"
            f"LogFile \"{self.log}\"\nMaxClients 20\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def connects(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines() if "CONNECT" in line]


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed (.ci/run installs the Debian package)")
    proxy = TinyProxy(tmp_path / "proxy")
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_token_requests_go_through_the_proxy(m365: SimulatedM365, relay_factory: RelayFactory,
                                             tinyproxy: TinyProxy) -> None:
    app = relay_config(m365, Path("/unused"))["apps"][0]
    app["proxy"] = f"http://127.0.0.1:{tinyproxy.port}"
    relay = relay_factory(apps=[app])
    code, resp = _send(relay.port, STANDARD_MAILBOX, "via proxy")
    assert code == 250 and b"delivered" in resp, resp
    wait_until(lambda: any(f"localhost:{m365.entra.port}" in line for line in tinyproxy.connects()), 10,
               "the proxy's log to show the token request")


def test_proxy_down_defers_and_never_bounces(m365: SimulatedM365, relay_factory: RelayFactory,
                                             tinyproxy: TinyProxy) -> None:
    app = relay_config(m365, Path("/unused"))["apps"][0]
    app["proxy"] = f"http://127.0.0.1:{tinyproxy.port}"
    tinyproxy.stop()
    relay = relay_factory(apps=[app], delivery={"sync_wait": 3, "retry": {"first": 0.2, "max": 0.5}})
    code, resp = _send(relay.port, STANDARD_MAILBOX, "proxy down")
    assert code == 250 and b"queued as" in resp, resp
    assert m365.exchange.accepted == []
    tinyproxy.start()
    wait_until(lambda: len(m365.exchange.accepted) == 1, 60, "delivery once the proxy is back")


def test_https_proxy_environment_variable_is_honoured(m365: SimulatedM365, tmp_path: Path,
                                                      tinyproxy: TinyProxy) -> None:
    from relay.config import settings_from_dict
    from relay.microsoft.tokens import build_http_session

    settings = settings_from_dict(relay_config(m365, tmp_path))
    session = build_http_session(settings.apps[0], {"HTTPS_PROXY": f"http://127.0.0.1:{tinyproxy.port}"})
    assert session.proxies["https"] == f"http://127.0.0.1:{tinyproxy.port}"
    bypass = build_http_session(settings.apps[0], {"HTTPS_PROXY": "http://127.0.0.1:1", "NO_PROXY": "localhost"})
    assert not bypass.proxies


def test_custom_ca_is_required_and_sufficient(m365: SimulatedM365, relay_factory: RelayFactory) -> None:
    """The simulated Entra ID and Exchange are signed by their own test CA: trusted only when configured."""
    app = relay_config(m365, Path("/unused"))["apps"][0]
    untrusted = {k: v for k, v in app.items() if k not in ("token_ca_file", "smtp_ca_file")}
    relay = relay_factory(apps=[untrusted], delivery={"sync_wait": 3})
    code, resp = _send(relay.port, STANDARD_MAILBOX, "untrusted CA")
    assert code == 250 and b"queued as" in resp, "certificate trouble holds the message, never bounces it"
    assert m365.exchange.accepted == []
    [hold] = relay.relay.delivery.held.holds()
    assert (hold.scope, hold.reason) == ("app", "token_config")
    assert "token_ca_file" in hold.reply
    # Trust only the token endpoint's CA: the SMTP side still fails verification.
    token_only = dict(untrusted, token_ca_file=app["token_ca_file"])
    relay2 = relay_factory(apps=[token_only], delivery={"sync_wait": 3})
    code, resp = _send(relay2.port, STANDARD_MAILBOX, "token CA only")
    assert b"queued as" in resp
    assert m365.exchange.accepted == []
    [hold] = relay2.relay.delivery.held.holds()
    assert (hold.scope, hold.reason) == ("app", "tls")
    assert "smtp_ca_file" in hold.hint
    relay3 = relay_factory(apps=[app])
    code, resp = _send(relay3.port, STANDARD_MAILBOX, "both CAs")
    assert code == 250 and b"delivered" in resp, resp


def _two_tenants(m365: SimulatedM365) -> None:
    m365.add_tenant(TENANT_B, domains=("fabrikam.onmicrosoft.com",))
    m365.add_app(TENANT_B, CLIENT_B, secret=SECRET_B)
    m365.add_mailbox(TENANT_B, MAILBOX_B, full_access=(CLIENT_B,))


def _two_tenant_relay(m365: SimulatedM365, relay_factory: RelayFactory) -> RelayThread:
    base = relay_config(m365, Path("/unused"))
    app_a = base["apps"][0]
    app_b = dict(app_a, name="fabrikam", tenant_id=TENANT_B, client_id=CLIENT_B, client_secret=SECRET_B)
    return relay_factory(
        apps=[app_a, app_b],
        mailboxes=[{"address": STANDARD_MAILBOX, "app": "contoso"}, {"address": MAILBOX_B, "app": "fabrikam"}],
        delivery={"sync_wait": 5, "retry": {"first": 0.2, "max": 0.5}},
    )


def test_each_mailbox_goes_with_its_own_tenants_token(m365: SimulatedM365, relay_factory: RelayFactory) -> None:
    _two_tenants(m365)
    relay = _two_tenant_relay(m365, relay_factory)
    assert _send(relay.port, STANDARD_MAILBOX, "tenant A")[0] == 250
    assert _send(relay.port, MAILBOX_B, "tenant B")[0] == 250
    got = {a.mailbox: (a.tenant_id, a.client_id) for a in m365.exchange.accepted}
    assert got == {STANDARD_MAILBOX: (STANDARD_TENANT, STANDARD_CLIENT_ID), MAILBOX_B: (TENANT_B, CLIENT_B)}
    assert m365.entra.token_requests_for(STANDARD_TENANT, STANDARD_CLIENT_ID) == 1
    assert m365.entra.token_requests_for(TENANT_B, CLIENT_B) == 1


def test_a_broken_secret_in_tenant_a_holds_only_tenant_a(m365: SimulatedM365, relay_factory: RelayFactory) -> None:
    _two_tenants(m365)
    m365.entra.remove_secret(STANDARD_TENANT, STANDARD_CLIENT_ID, STANDARD_SECRET)
    relay = _two_tenant_relay(m365, relay_factory)
    code, resp = _send(relay.port, STANDARD_MAILBOX, "tenant A, broken secret")
    assert code == 250 and b"queued as" in resp
    code, resp = _send(relay.port, MAILBOX_B, "tenant B, fine")
    assert code == 250 and b"delivered" in resp, resp
    assert [a.mailbox for a in m365.exchange.accepted] == [MAILBOX_B]
    holds = relay.relay.delivery.held.holds()
    assert [(h.scope, h.name) for h in holds] == [("app", "contoso")]
    assert "7000215" in holds[0].reply or "invalid_client" in holds[0].reply
    # More mail for B keeps flowing while A is held.
    assert b"delivered" in _send(relay.port, MAILBOX_B, "tenant B again")[1]
