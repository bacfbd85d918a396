"""``oauth-smtp-relay check`` against the simulated Microsoft 365, one failure mode per test.

Each test runs ``python -m relay check`` as a real subprocess (a fresh MSAL, so its 60 s cache of
HTTP 400 answers cannot leak between tests) against a fresh simulated tenant, and asserts the step
that fails, the admin step and hint it names, and the exit code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relay.testing.certs import make_app_certificate, write_server_certificates
from relay.testing.harness import free_port, relay_config, write_config
from relay.testing.m365 import (
    STANDARD_CLIENT_ID,
    STANDARD_MAILBOX,
    STANDARD_SECRET,
    STANDARD_TENANT,
    SimulatedM365,
)

ROOT = Path(__file__).resolve().parent.parent
OTHER_CLIENT = "33333333-3333-3333-3333-333333333333"


def run_check(config: dict[str, Any], tmp_path: Path, *args: str) -> tuple[int, str]:
    path = write_config(config, tmp_path / "check.yaml")
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(path), *args],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


def run_json(config: dict[str, Any], tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, out = run_check(config, tmp_path, "--json", *args)
    assert_no_token(out)
    return code, json.loads(out)


def assert_no_token(text: str) -> None:
    """No JWT (header.payload.signature, base64url of '{"') and no client secret in the output."""
    assert not re.search(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+", text)
    assert STANDARD_SECRET not in text


def first_failure(report: dict[str, Any]) -> dict[str, Any]:
    failed: list[dict[str, Any]] = [s for s in report["steps"] if s["status"] == "fail"]
    assert failed, report
    return failed[0]


def by_kind(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in report["steps"] if s["kind"] == kind]


def config_for(m365: SimulatedM365, tmp_path: Path, **app: Any) -> dict[str, Any]:
    config = relay_config(m365, tmp_path)
    config["apps"][0].update(app)
    for key in [k for k, v in app.items() if v is None]:
        del config["apps"][0][key]
    return config


# --------------------------------------------------------------------------- all good

def test_all_good_exits_0_with_a_line_per_step(m365: SimulatedM365, tmp_path: Path) -> None:
    code, out = run_check(relay_config(m365, tmp_path), tmp_path)
    assert code == 0, out
    assert_no_token(out)
    lines = out.strip().splitlines()
    assert lines[-1] == "all checks passed"
    assert [line.split("]")[0] + "]" for line in lines[:-1]] == ["[PASS]"] * 6
    text = "\n".join(lines)
    for expected in ("configuration", "token for app contoso", "roles=SMTP.SendAsApp",
                     f"tid={STANDARD_TENANT}", "aud=https://outlook.office365.com", "TCP connection to localhost:",
                     "certificate verified", f"AUTH XOAUTH2 as {STANDARD_MAILBOX}: 235"):
        assert expected in text


def test_all_good_json_with_test_message(m365: SimulatedM365, tmp_path: Path) -> None:
    code, report = run_json(relay_config(m365, tmp_path), tmp_path, "--send-to", "someone@fabrikam.example")
    assert code == 0
    assert report["ok"] is True
    assert [s["kind"] for s in report["steps"]] == ["config", "token", "claims", "tcp", "starttls", "auth", "send"]
    assert all(s["status"] == "pass" for s in report["steps"])
    accepted = m365.exchange.accepted
    assert len(accepted) == 1
    assert accepted[0].rcpt_tos == ("someone@fabrikam.example",)
    assert accepted[0].mailbox == STANDARD_MAILBOX


def test_certificate_credential_passes(m365: SimulatedM365, tmp_path: Path) -> None:
    cert = make_app_certificate()
    m365.add_app(STANDARD_TENANT, OTHER_CLIENT, certificate=cert)
    m365.grant_full_access(STANDARD_MAILBOX, OTHER_CLIENT)
    (tmp_path / "app.key").write_bytes(cert.private_key_pem)
    config = config_for(m365, tmp_path, client_id=OTHER_CLIENT, client_secret=None,
                        certificate={"private_key_file": str(tmp_path / "app.key"),
                                     "thumbprint": cert.thumbprint_sha1_hex})
    code, report = run_json(config, tmp_path)
    assert code == 0, report


# --------------------------------------------------------------------------- Entra ID failures

def test_bad_secret_7000215(m365: SimulatedM365, tmp_path: Path) -> None:
    wrong = "0a1b2c3d-wrong-secret-id-looks-like-a-guid"
    code, out = run_check(config_for(m365, tmp_path, client_secret=wrong), tmp_path)
    assert code == 1
    assert wrong not in out
    assert "[FAIL] token for app contoso: invalid_client AADSTS7000215" in out
    assert "Value was expected, not the Secret ID" in out
    assert "admin step 4" in out
    assert "[SKIP] AUTH XOAUTH2 as relay@contoso.com: no token" in out
    assert out.strip().splitlines()[-1].endswith("token for app contoso (admin step 4)")


def test_expired_secret_7000222(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.add_app(STANDARD_TENANT, OTHER_CLIENT, secret="expired~secret.value", secret_expires_at=time.time() - 60)
    code, report = run_json(config_for(m365, tmp_path, client_id=OTHER_CLIENT, client_secret="expired~secret.value"),
                            tmp_path)
    assert code == 1
    step = first_failure(report)
    assert step["kind"] == "token"
    assert "AADSTS7000222" in step["detail"]
    assert step["admin_step"] == 4
    assert "client secret expired: create a new client secret" in step["hint"]
    assert "expired~secret.value" not in json.dumps(report)


def test_unknown_tenant_90002(m365: SimulatedM365, tmp_path: Path) -> None:
    wrong_tenant = "99999999-9999-4999-8999-999999999999"
    code, report = run_json(config_for(m365, tmp_path, tenant_id=wrong_tenant), tmp_path)
    assert code == 1
    step = first_failure(report)
    assert step["kind"] == "token"
    assert "AADSTS90002" in step["detail"]
    assert wrong_tenant in step["detail"]
    assert step["admin_step"] == 1
    assert "wrong tenant ID, or the app is configured for the wrong cloud" in step["hint"]
    # The SMTP side was still checked: a second problem there would show up in the same run.
    assert [s["status"] for s in by_kind(report, "starttls")] == ["pass"]
    assert [s["status"] for s in by_kind(report, "auth")] == ["skip"]


def test_token_endpoint_unreachable(m365: SimulatedM365, tmp_path: Path) -> None:
    code, report = run_json(config_for(m365, tmp_path, authority_host=f"https://localhost:{free_port()}"), tmp_path)
    assert code == 1
    step = first_failure(report)
    assert (step["kind"], step["admin_step"]) == ("token", None)
    assert "cannot reach localhost:" in step["detail"] and "connection refused" in step["detail"]
    assert "firewall and the HTTPS proxy" in step["hint"]


def test_certificate_mismatch_700027(m365: SimulatedM365, tmp_path: Path) -> None:
    uploaded, local = make_app_certificate(), make_app_certificate()
    m365.add_app(STANDARD_TENANT, OTHER_CLIENT, certificate=uploaded)
    (tmp_path / "app.key").write_bytes(local.private_key_pem)
    (tmp_path / "app.pem").write_bytes(local.certificate_pem)
    config = config_for(m365, tmp_path, client_id=OTHER_CLIENT, client_secret=None,
                        certificate={"private_key_file": str(tmp_path / "app.key"),
                                     "certificate_file": str(tmp_path / "app.pem")})
    code, report = run_json(config, tmp_path)
    assert code == 1
    step = first_failure(report)
    assert step["kind"] == "token"
    assert "AADSTS700027" in step["detail"]
    assert step["admin_step"] == 4
    assert "does not match the certificate uploaded to the app" in step["hint"]
    assert "PRIVATE KEY" not in json.dumps(report)


def test_token_without_the_role_no_admin_consent(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.set_admin_consent(STANDARD_TENANT, STANDARD_CLIENT_ID, False)
    code, out = run_check(relay_config(m365, tmp_path), tmp_path)
    assert code == 1
    assert_no_token(out)
    assert "[PASS] token for app contoso" in out  # Entra ID issues the token silently...
    assert "[FAIL] token claims for app contoso: roles [] lack SMTP.SendAsApp" in out  # ...without the role
    assert "Office 365 Exchange Online > Application permissions > SMTP.SendAsApp" in out
    consent = (f"/{STANDARD_TENANT}/v2.0/adminconsent?client_id={STANDARD_CLIENT_ID}"
               "&redirect_uri=<REDIRECT_URI>&scope=https://outlook.office365.com/.default")
    assert consent in out
    # Exchange then refuses with 5.7.3, and check points back at the missing role first.
    assert "[FAIL] AUTH XOAUTH2 as relay@contoso.com: 535 5.7.3" in out
    assert "The token lacks SMTP.SendAsApp (see the claims step above)" in out
    assert "fix the first one first: token claims for app contoso (admin step 3)" in out


# --------------------------------------------------------------------------- Exchange failures

def test_smtp_auth_disabled_5_7_139(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.set_mailbox_smtp_auth(STANDARD_MAILBOX, False)
    code, out = run_check(relay_config(m365, tmp_path), tmp_path)
    assert code == 1
    assert "[FAIL] AUTH XOAUTH2 as relay@contoso.com: 535 5.7.139" in out
    assert "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false" in out
    assert "(admin step 6)" in out
    assert "[PASS] token claims" in out


def test_smtp_auth_disabled_for_the_tenant_json(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.set_tenant_smtp_auth(STANDARD_TENANT, False)
    code, report = run_json(relay_config(m365, tmp_path), tmp_path)
    assert code == 1
    step = first_failure(report)
    assert (step["kind"], step["admin_step"], step["mailbox"]) == ("auth", 6, STANDARD_MAILBOX)
    assert "5.7.139" in step["detail"]


def test_no_mailbox_permission_5_7_3(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.revoke_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
    code, out = run_check(relay_config(m365, tmp_path), tmp_path)
    assert code == 1
    assert "[FAIL] AUTH XOAUTH2 as relay@contoso.com: 535 5.7.3 Authentication unsuccessful" in out
    assert "[SIM01" not in out  # Exchange's varying [server timestamp id] tail is dropped
    assert f"New-ServicePrincipal -AppId {STANDARD_CLIENT_ID} -ObjectId <ENTERPRISE_APP_OBJECT_ID>" in out
    assert "NOT from App registrations" in out
    assert ("Add-MailboxPermission -Identity relay@contoso.com -User <SERVICE_PRINCIPAL_ID> "
            "-AccessRights FullAccess") in out
    assert "fix the first one first: AUTH XOAUTH2 as relay@contoso.com (admin step 5)" in out


def test_one_mailbox_of_two_without_permission(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.add_mailbox(STANDARD_TENANT, "billing@contoso.com")  # exists, but no FullAccess for the app
    config = relay_config(m365, tmp_path)
    config["mailboxes"].append({"address": "billing@contoso.com", "app": "contoso"})
    code, report = run_json(config, tmp_path)
    assert code == 1
    auth = {s["mailbox"]: s["status"] for s in by_kind(report, "auth")}
    assert auth == {STANDARD_MAILBOX: "pass", "billing@contoso.com": "fail"}
    assert "Add-MailboxPermission -Identity billing@contoso.com" in first_failure(report)["hint"]


# --------------------------------------------------------------------------- transport and config

def test_untrusted_smtp_certificate(m365: SimulatedM365, tmp_path: Path) -> None:
    other = write_server_certificates(tmp_path / "other-ca")
    code, report = run_json(config_for(m365, tmp_path, smtp_ca_file=str(other.ca_file)), tmp_path)
    assert code == 1
    step = first_failure(report)
    assert step["kind"] == "starttls"
    assert "certificate verification failed" in step["detail"]
    assert "TLS-intercepting proxy" in step["hint"]
    assert [s["status"] for s in by_kind(report, "tcp")] == ["pass"]
    assert [s["status"] for s in by_kind(report, "auth")] == ["skip"]


def test_nothing_listening_on_the_smtp_port(m365: SimulatedM365, tmp_path: Path) -> None:
    code, report = run_json(config_for(m365, tmp_path, smtp_port=free_port()), tmp_path)
    assert code == 1
    step = first_failure(report)
    assert step["kind"] == "tcp"
    assert "firewall" in step["hint"]


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apps: []\nmailboxes: []\n")
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stdout.startswith("[FAIL] configuration")


def test_offline_only_validates(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.stop()  # nothing to talk to: --offline must not try
    code, out = run_check(relay_config(m365, tmp_path), tmp_path, "--offline")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("[PASS] configuration") and lines[-1] == "all checks passed"
    assert [line.split(":", 1)[0] for line in lines[1:-1]] == [f"[PASS] spool {tmp_path / 'spool'}"], lines


# --------------------------------------------------------------------------- the docs snapshot

def _normalise(text: str, config_path: Path) -> str:
    text = text.replace(str(config_path), "/etc/oauth-smtp-relay/config.yaml")
    text = re.sub(r"localhost:\d+", "smtp.office365.com:587", text)
    text = re.sub(r"expires in \d+ min", "expires in NN min", text)
    return text


@pytest.mark.parametrize("doc", ["docs/check.md"])
def test_docs_snapshot_matches_the_current_output(m365: SimulatedM365, tmp_path: Path, doc: str) -> None:
    """docs/check.md shows a real failing run (no FullAccess on the mailbox); keep it in step."""
    m365.revoke_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
    code, out = run_check(relay_config(m365, tmp_path), tmp_path)
    assert code == 1
    snapshot = (ROOT / doc).read_text()
    for line in _normalise(out, tmp_path / "check.yaml").splitlines():
        if line.startswith("[PASS] token for app"):
            continue  # names the (simulated) authority host
        assert line in snapshot, f"{doc} is out of date; missing line:\n{line}"
