"""Operating the relay: metrics, health and readiness, the ``health`` command, delivery logs,
SIGHUP reload, sd_notify, the systemd unit, and ``exchange-setup``.

Everything runs on 127.0.0.1 against the simulated Microsoft 365, with real clients (smtplib,
urllib) and real subprocesses where the behaviour belongs to the process (signals, logs, exit codes).
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import load_settings
from relay.testing.harness import (
    DEMO_PASSWORD,
    DEMO_USER,
    RelayProcess,
    RelayThread,
    free_port,
    http_get,
    quick_hash,
    relay_config,
    wait_until,
    write_config,
)
from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_MAILBOX, STANDARD_SEND_AS, SimulatedM365
from tests.fakeclock import FakeClock

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "oauth-smtp-relay.service"


# --------------------------------------------------------------------------- helpers

def message(sender: str = STANDARD_MAILBOX, to: str = "customer@fabrikam.example",
            subject: str = "hello") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="legacy-app.local")
    msg.set_content("Sent through oauth-smtp-relay.\n")
    return msg


def send(port: int, msg: EmailMessage, *, user: str | None = DEMO_USER, password: str = DEMO_PASSWORD) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        if user is not None:
            client.login(user, password)
        client.send_message(msg)


def scrape(url: str) -> dict[str, float]:
    """``{'name{label="v",...}': value}`` for every sample of a /metrics page."""
    status, text = http_get(url)
    assert status == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def has_event(path: Path, event: str, count: int = 1) -> bool:
    return sum(1 for e in log_events(path) if e.get("event") == event) >= count


@pytest.fixture
def process_relays() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for proc in started:
        proc.kill()


# --------------------------------------------------------------------------- metrics

def test_metrics_after_traffic_show_what_happened(m365: SimulatedM365, relay_factory: Any) -> None:
    http_port = free_port()
    relay = relay_factory(observability={"log_format": "json", "log_level": "info",
                                         "http": f"127.0.0.1:{http_port}"})
    m365.exchange.add_unknown_recipient("nobody@contoso.com")
    send(relay.port, message(subject="one"))
    send(relay.port, message(sender=STANDARD_SEND_AS, subject="two"), user=None)  # allowlisted, no AUTH
    with pytest.raises(smtplib.SMTPDataError) as refused:  # Exchange refuses the only recipient for good
        send(relay.port, message(to="nobody@contoso.com", subject="three"))
    assert refused.value.smtp_code == 550
    wait_until(lambda: len(m365.exchange.accepted) == 2, 30, "two deliveries")

    m = scrape(f"http://127.0.0.1:{http_port}/metrics")
    assert m["relay_messages_received_total"] == 3
    assert m[f'relay_messages_delivered_total{{mailbox="{STANDARD_MAILBOX}"}}'] == 2
    assert total(m, "relay_messages_failed_total") == 1
    assert total(m, "relay_messages_deferred_total") == 0
    assert total(m, "relay_upstream_attempt_seconds_count") == 3
    assert m['relay_token_requests_total{app="contoso"}'] == m365.entra.token_requests == 1
    assert total(m, "relay_token_failures_total") == 0
    assert 0 < m['relay_token_seconds_to_expiry{app="contoso"}'] <= 90 * 60
    assert m["relay_held"] == 0
    assert total(m, "relay_queue_messages") == 0 or all(
        v == 0 for k, v in m.items() if k.startswith("relay_queue_messages{") and "delivered" not in k
        and "dead" not in k)
    assert m["relay_queue_oldest_seconds"] >= 0
    assert http_get(f"http://127.0.0.1:{http_port}/healthz") == (200, "ok\n")
    assert http_get(f"http://127.0.0.1:{http_port}/nope")[0] == 404


def test_readyz_is_503_while_a_mailbox_is_held_and_200_after_the_fix(m365: SimulatedM365, tmp_path: Path) -> None:
    http_port = free_port()
    config = relay_config(m365, tmp_path, overrides={
        "observability": {"log_format": "json", "log_level": "info", "http": f"127.0.0.1:{http_port}"}})
    path = write_config(config, tmp_path / "relay.yaml")
    clock = FakeClock(time.time())  # moved forward by the test: probe intervals without sleeping
    readyz = f"http://127.0.0.1:{http_port}/readyz"
    with RelayThread(load_settings(path), clock=clock, config_path=str(path)) as relay:
        status, body = http_get(readyz)
        assert status == 200, body
        assert run_cli("health", "-c", str(path)).returncode == 0

        # The admin removes FullAccess: Exchange answers 535 5.7.3, the relay holds the mailbox.
        m365.revoke_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
        send(relay.port, message(subject="held"))
        wait_until(lambda: http_get(readyz)[0] == 503, 15, "readiness to turn red")
        ready = json.loads(http_get(readyz)[1])
        assert ready["ready"] is False and ready["listening"] is True and ready["spool_writable"] is True
        assert [(h["scope"], h["name"]) for h in ready["holds"]] == [("mailbox", STANDARD_MAILBOX)]
        assert "5.7.3" in ready["holds"][0]["reply"]
        assert "Add-MailboxPermission" in ready["holds"][0]["hint"]
        metrics = scrape(f"http://127.0.0.1:{http_port}/metrics")
        assert metrics["relay_held"] == 1
        held = {k: v for k, v in metrics.items() if k.startswith("relay_hold{")}
        assert held == {f'relay_hold{{name="{STANDARD_MAILBOX}",reason="auth_failed",scope="mailbox"}}': 1.0}, held
        health = run_cli("health", "-c", str(path))
        assert health.returncode == 1
        assert '"ready": false' in health.stdout
        assert m365.exchange.accepted == []
        # The queue CLI (another process) shows the daemon's hold, with the admin step to fix.
        wait_until(lambda: json.loads(run_cli("queue", "-c", str(path), "--json", "holds").stdout)["holds"], 15,
                   "holds.json to be written")
        shown = json.loads(run_cli("queue", "-c", str(path), "--json", "holds").stdout)
        assert shown["relay_running"] is True
        assert [(h["scope"], h["name"], h["reason"]) for h in shown["holds"]] == [
            ("mailbox", STANDARD_MAILBOX, "auth_failed")]
        listed = run_cli("queue", "-c", str(path), "list").stdout
        assert f"ON HOLD mailbox {STANDARD_MAILBOX}" in listed and "Add-MailboxPermission" in listed, listed

        # The admin fixes it; the next hold probe (due 30 s later: moved forward) lifts the hold.
        m365.grant_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
        clock.advance(31)
        wait_until(lambda: http_get(readyz)[0] == 200, 15, "readiness to turn green again")
        wait_until(lambda: len(m365.exchange.accepted) == 1, 30, "the held message to be delivered")
        metrics = scrape(f"http://127.0.0.1:{http_port}/metrics")
        assert metrics["relay_held"] == 0 and not any(k.startswith("relay_hold{") for k in metrics)
        assert run_cli("health", "-c", str(path)).returncode == 0
        wait_until(lambda: "no app or mailbox on hold" in run_cli("queue", "-c", str(path), "holds").stdout, 15,
                   "the released hold to leave holds.json")
        del relay
    assert "the relay is not running" in run_cli("queue", "-c", str(path), "holds").stdout


def test_health_command_without_endpoint_or_relay(tmp_path: Path, m365: SimulatedM365) -> None:
    no_http = write_config(relay_config(m365, tmp_path), tmp_path / "no-http.yaml")
    result = run_cli("health", "-c", str(no_http))
    assert result.returncode == 2
    assert "observability.http is not set" in result.stderr
    nobody = run_cli("health", "--url", f"http://127.0.0.1:{free_port()}/readyz", "--timeout", "2")
    assert nobody.returncode == 1
    assert "cannot reach" in nobody.stderr


# --------------------------------------------------------------------------- logs, SIGHUP, sd_notify

def _process_config(m365: SimulatedM365, tmp_path: Path, **overrides: Any) -> tuple[dict[str, Any], int]:
    port = free_port()
    return relay_config(m365, tmp_path, port=port, overrides=overrides), port


def test_delivery_log_line_has_what_message_trace_needs(m365: SimulatedM365, tmp_path: Path,
                                                        process_relays: list[RelayProcess]) -> None:
    config, port = _process_config(m365, tmp_path)
    proc = RelayProcess(write_config(config, tmp_path / "relay.yaml"))
    process_relays.append(proc)
    proc.start(port)
    msg = message(to="a@fabrikam.example")
    msg["Cc"] = "b@fabrikam.example"
    send(port, msg)
    wait_until(lambda: has_event(proc.log_path, "delivered"), 30, "the delivered log line")
    assert proc.terminate() == 0
    events = log_events(proc.log_path)  # every line is one JSON object (json.loads did not fail)
    delivered = next(e for e in events if e.get("event") == "delivered")
    accepted = m365.exchange.accepted[0]
    assert delivered["message_id"] == msg["Message-ID"]
    assert delivered["mailbox"] == STANDARD_MAILBOX
    assert delivered["recipients"] == 2
    assert re.fullmatch(r"[0-9A-Za-z]+", delivered["queue_id"])
    assert delivered["reply"].startswith("250 2.0.0 OK")
    assert delivered["upstream_id"] and accepted.queue_id in delivered["upstream_id"]
    assert isinstance(delivered["duration_ms"], int) and delivered["duration_ms"] >= 0
    assert {"ts", "level", "logger", "msg"} <= delivered.keys()
    received = next(e for e in events if e.get("event") == "received")
    assert received["queue_id"] == delivered["queue_id"]
    text = proc.log_path.read_text()
    assert DEMO_PASSWORD not in text and "Sent through oauth-smtp-relay" not in text  # no secrets, no bodies


def test_serve_log_format_text(m365: SimulatedM365, tmp_path: Path) -> None:
    config, port = _process_config(m365, tmp_path)
    path = write_config(config, tmp_path / "relay.yaml")
    log_path = tmp_path / "text.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(path), "--log-format", "text"],
                                stdout=log, stderr=log)
    try:
        from relay.testing.harness import wait_for_port

        wait_for_port("127.0.0.1", port, 30, proc)
        send(port, message())
        wait_until(lambda: " delivered " in log_path.read_text() or "delivered" in log_path.read_text(), 30,
                   "the delivered log line")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    lines = log_path.read_text().splitlines()
    assert lines and not any(line.startswith("{") for line in lines)
    line = next(line for line in lines if re.search(r"\bdelivered\b", line) and "queue_id=" in line)
    assert re.match(r"\d\d:\d\d:\d\d INFO ", line)
    for key in ("queue_id=", "message_id=", f"mailbox={STANDARD_MAILBOX}", "recipients=1", "upstream_id=",
                "duration_ms="):
        assert key in line


def test_sighup_adds_a_user_without_dropping_connections_or_mail(
        m365: SimulatedM365, tmp_path: Path, process_relays: list[RelayProcess]) -> None:
    # sync_wait 0: the client hears "queued" at once and delivery runs in the background, slowed
    # down by Exchange so that the reload happens while a delivery is in flight.
    config, port = _process_config(m365, tmp_path, delivery={"sync_wait": 0, "timeout": 10,
                                                              "retry": {"first": 1, "max": 5}})
    path = write_config(config, tmp_path / "relay.yaml")
    proc = RelayProcess(path)
    process_relays.append(proc)
    proc.start(port)

    with pytest.raises(smtplib.SMTPAuthenticationError):
        send(port, message(), user="scanner", password="scanner-pw-4711")

    m365.exchange.set_reply_delay(0.2)
    open_session = smtplib.SMTP("127.0.0.1", port, timeout=30)  # stays open across the reload
    open_session.login(DEMO_USER, DEMO_PASSWORD)
    open_session.send_message(message(subject="before reload"))
    # In flight: the relay's session to Exchange is open, the message not accepted yet.
    wait_until(lambda: m365.exchange.stats().connections >= 1, 10, "the delivery to reach Exchange")

    config["users"].append({"name": "scanner", "password_hash": quick_hash("scanner-pw-4711"),
                            "may_send_as": [STANDARD_MAILBOX]})
    write_config(config, path)
    proc.signal(signal.SIGHUP)
    wait_until(lambda: has_event(proc.log_path, "reloaded"), 15, "the reload")

    open_session.send_message(message(subject="same session, after reload"))
    open_session.quit()
    send(port, message(subject="new user"), user="scanner", password="scanner-pw-4711")
    m365.exchange.set_reply_delay(0)
    wait_until(lambda: len(m365.exchange.accepted) == 3, 45, "all three messages at Exchange")
    subjects = sorted(a.eml_path.read_text().split("Subject: ", 1)[1].splitlines()[0]
                      for a in m365.exchange.accepted)
    assert subjects == ["before reload", "new user", "same session, after reload"]
    assert proc.proc is not None and proc.proc.poll() is None
    assert proc.terminate() == 0


def test_sighup_with_a_broken_config_keeps_the_running_one(
        m365: SimulatedM365, tmp_path: Path, process_relays: list[RelayProcess]) -> None:
    config, port = _process_config(m365, tmp_path)
    path = write_config(config, tmp_path / "relay.yaml")
    proc = RelayProcess(path)
    process_relays.append(proc)
    proc.start(port)
    path.write_text("users: [\n")  # not YAML
    proc.signal(signal.SIGHUP)
    wait_until(lambda: has_event(proc.log_path, "reload_failed"), 15, "the refused reload")
    send(port, message())
    wait_until(lambda: len(m365.exchange.accepted) == 1, 30, "delivery with the old config")
    assert proc.terminate() == 0


def test_sd_notify_ready_watchdog_stopping(m365: SimulatedM365, tmp_path: Path,
                                           process_relays: list[RelayProcess]) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(10)
    try:
        config, port = _process_config(m365, tmp_path)
        proc = RelayProcess(write_config(config, tmp_path / "relay.yaml"),
                            env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
        process_relays.append(proc)
        proc.start(port)
        seen: list[str] = []

        def receive_until(word: str) -> None:
            deadline = time.monotonic() + 15
            while not any(word in m for m in seen):
                assert time.monotonic() < deadline, f"no {word} from the relay; got {seen}"
                seen.append(sock.recv(4096).decode())

        receive_until("READY=1")
        receive_until("WATCHDOG=1")
        proc.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert proc.proc is not None and proc.proc.wait(30) == 0
        assert seen.index(next(m for m in seen if "READY=1" in m)) < seen.index(
            next(m for m in seen if "STOPPING=1" in m))
    finally:
        sock.close()


# --------------------------------------------------------------------------- systemd unit

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
}


def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_unit_is_type_notify_hardened_and_uses_credentials() -> None:
    d = unit_directives()
    for key, value in HARDENING.items():
        assert d.get(key) == [value], f"{key}={value} missing (found {d.get(key)})"
    assert "@system-service" in d["SystemCallFilter"]
    assert d["Type"] == ["notify"]
    assert d["WatchdogSec"] and d["DynamicUser"] == ["yes"]
    assert d["StateDirectory"] == ["oauth-smtp-relay"]
    assert d["LoadCredential"] == ["client_secret:/etc/oauth-smtp-relay/client_secret"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert any(" serve " in v for v in d["ExecStart"])
    assert not any(k.startswith("AmbientCapabilities") and v for k, vs in d.items() for v in vs)
    doc = (ROOT / "docs" / "systemd.md").read_text()
    assert "${CREDENTIALS_DIRECTORY}/client_secret" in doc and "/var/lib/oauth-smtp-relay/spool" in doc
    assert "systemctl reload oauth-smtp-relay" in doc


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package 'systemd'; .ci/run installs it)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists: point it at this checkout's installed entry point.
    exe = shutil.which("oauth-smtp-relay") or str(Path(sys.executable).parent / "oauth-smtp-relay")
    assert os.access(exe, os.X_OK), exe
    unit = tmp_path / "oauth-smtp-relay.service"
    unit.write_text(UNIT.read_text().replace("/opt/oauth-smtp-relay/bin/oauth-smtp-relay", exe))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "oauth-smtp-relay" in line or "Unknown" in line or "ignoring" in line]
    assert problems == [], problems


# --------------------------------------------------------------------------- exchange-setup

def _setup_config(tmp_path: Path, cloud: str = "global") -> Path:
    config = {
        "accept": {"networks": ["127.0.0.0/8",
                                {"network": "10.20.30.0/24", "may_send_as": ["scanner@contoso.com"],
                                 "mailbox": "relay@contoso.com"}]},
        "users": [
            {"name": "erp", "password_hash": quick_hash("x"),
             "may_send_as": ["relay@contoso.com", "Alerts@Contoso.com", "@billing.contoso.com",
                             "alerts-*@contoso.com"]},
            {"name": "crm", "password_hash": quick_hash("x"), "may_send_as": ["alerts@contoso.com"],
             "mailbox": "billing@contoso.com"},
        ],
        "apps": [{"name": "contoso", "cloud": cloud, "tenant_id": "11111111-1111-1111-1111-111111111111",
                  "client_id": "22222222-2222-2222-2222-222222222222", "client_secret": "not-printed~secret"}],
        "mailboxes": [{"address": "relay@contoso.com", "app": "contoso"},
                      {"address": "billing@contoso.com", "app": "contoso"}],
        "sender": {"default_mailbox": "relay@contoso.com"},
        "spool": {"path": str(tmp_path / "spool")},
    }
    return write_config(config, tmp_path / f"{cloud}.yaml")


def test_exchange_setup_prints_the_admin_steps_filled_in(tmp_path: Path) -> None:
    result = run_cli("exchange-setup", "-c", str(_setup_config(tmp_path)), "--redirect-uri", "https://contoso.com/ok")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "not-printed~secret" not in out
    assert ("https://login.microsoftonline.com/11111111-1111-1111-1111-111111111111/v2.0/adminconsent"
            "?client_id=22222222-2222-2222-2222-222222222222&redirect_uri=https%3A%2F%2Fcontoso.com%2Fok"
            "&scope=https://outlook.office365.com/.default") in out
    assert "New-ServicePrincipal -AppId $AppId -ObjectId $ObjectId" in out
    assert "$AppId = '22222222-2222-2222-2222-222222222222'" in out
    assert "Enterprise application" in out and "NOT the Object ID shown under App registrations" in out
    for mbx in ("relay@contoso.com", "billing@contoso.com"):
        assert f"Add-MailboxPermission -Identity '{mbx}' -User $SpId -AccessRights FullAccess" in out
        assert f"Set-CASMailbox -Identity '{mbx}' -SmtpClientAuthenticationDisabled $false" in out
    grants = re.findall(r"^Add-RecipientPermission -Identity '([^']+)' -Trustee \$SpId -AccessRights SendAs", out,
                        re.MULTILINE)
    # exact addresses that are not mailboxes, once each (lower-cased), from users and networks
    assert grants == ["alerts@contoso.com", "scanner@contoso.com"]
    assert "users[erp], users[crm]" in out and "accept.networks[10.20.30.0/24]" in out
    assert "#   @billing.contoso.com" in out and "#   alerts-*@contoso.com" in out
    assert "Connect-ExchangeOnline\n" in out
    assert "Then run: oauth-smtp-relay check -c" in out


def test_exchange_setup_follows_the_cloud(tmp_path: Path) -> None:
    result = run_cli("exchange-setup", "-c", str(_setup_config(tmp_path, "gcc-high")),
                     "--object-id", "aaaaaaaa-0000-0000-0000-000000000001")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert ("https://login.microsoftonline.us/11111111-1111-1111-1111-111111111111/v2.0/adminconsent"
            "?client_id=22222222-2222-2222-2222-222222222222&redirect_uri=<REDIRECT_URI>"
            "&scope=https://outlook.office365.us/.default") in out
    assert "Connect-ExchangeOnline -ExchangeEnvironmentName O365USGovGCCHigh" in out
    # check's hint for missing consent (admin step 3) points at the same cloud.
    from relay.check import fill
    from relay.config import load_settings
    from relay.delivery.hints import STEPS
    app = load_settings(_setup_config(tmp_path, "gcc-high")).apps[0]
    assert ("https://login.microsoftonline.us/11111111-1111-1111-1111-111111111111/v2.0/adminconsent"
            "?client_id=22222222-2222-2222-2222-222222222222") in fill(STEPS[3].fix, app)
    assert "$ObjectId = 'aaaaaaaa-0000-0000-0000-000000000001'" in out


def test_exchange_setup_config_error_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apps: [{name: x}]\nmailboxes: []\n")
    result = run_cli("exchange-setup", "-c", str(path))
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "Traceback" not in result.stderr


def test_exchange_setup_works_without_the_secret_files(tmp_path: Path) -> None:
    """An admin prints the PowerShell on their own machine, where /run/secrets does not exist."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "apps:\n  - name: contoso\n    tenant_id: 11111111-1111-1111-1111-111111111111\n"
        "    client_id: 22222222-2222-2222-2222-222222222222\n"
        "    client_secret_file: /nonexistent/run/secrets/client_secret\n"
        "mailboxes: [{address: noreply@contoso.com, app: contoso}]\n")
    out = run_cli("exchange-setup", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "Add-MailboxPermission" in out.stdout and "noreply@contoso.com" in out.stdout
    # Commands that need the credential still refuse a missing secret file, naming the key.
    refused = run_cli("check", "--offline", "-c", str(cfg))
    assert refused.returncode == 2 and "client_secret_file" in refused.stdout + refused.stderr
