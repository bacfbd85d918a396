"""Secrets stay secret: a representative set of flows, good and failing, with every log
captured at DEBUG (in process and from a real ``serve`` subprocess), metrics and command output; none
of the secret values may appear anywhere. Also: the inline-secret permission warning.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay import config as relay_config_module
from relay.config import load_settings
from relay.observability import JsonFormatter, TextFormatter, setup_logging
from relay.testing.harness import (
    DEMO_PASSWORD,
    DEMO_USER,
    RelayProcess,
    RelayThread,
    free_port,
    relay_config,
    wait_until,
    write_config,
)
from relay.testing.m365 import STANDARD_MAILBOX, STANDARD_SECRET, SimulatedM365
from relay.testing.smtp_client import RawSMTP, plain_blob, simple_body

RCPT = "someone@fabrikam.example"
WRONG_PASSWORD = "Wr0ng-Leak-Canary-Pw!"
BODY_MARKER = b"BODY-CANARY-8d1f3c2a-do-not-log"


def secret_forms(value: str) -> list[str]:
    """A secret and the encodings it might be logged in."""
    raw = value.encode()
    return [value, base64.b64encode(raw).decode(), raw.hex()]


def xoauth2_tokens(m365: SimulatedM365) -> list[str]:
    """The bearer tokens the relay presented to the simulated Exchange."""
    tokens = []
    for attempt in m365.exchange.auth_attempts:
        try:
            decoded = base64.b64decode(attempt.raw).decode()
        except ValueError:
            continue
        for part in decoded.split("\x01"):
            if part.startswith("auth=Bearer "):
                tokens.append(part.removeprefix("auth=Bearer "))
    return tokens


def canaries(m365: SimulatedM365, key_pem: bytes) -> dict[str, list[str]]:
    key_lines = [ln for ln in key_pem.decode().splitlines() if ln and not ln.startswith("-----")]
    tokens = xoauth2_tokens(m365)
    assert tokens, "the flows should have made the relay present at least one token"
    out = {
        "client secret": secret_forms(STANDARD_SECRET),
        "local password": [*secret_forms(DEMO_PASSWORD), plain_blob(), plain_blob("erp", WRONG_PASSWORD)],
        "wrong password": secret_forms(WRONG_PASSWORD),
        "listener key": key_lines[1:4],
        "body": [BODY_MARKER.decode()],
    }
    for i, token in enumerate(tokens):
        # a JWT: the whole token, and its signature alone
        out[f"token {i}"] = [token, token.rsplit(".", 1)[-1]]
    return out


def assert_no_canary(where: str, text: str, found: dict[str, list[str]]) -> None:
    for name, forms in found.items():
        for form in forms:
            assert form not in text, f"{name} leaked into {where}"


def run_flows(port: int, tls_port: int | None, ca_file: Path | None) -> None:
    """Good and failing flows, including hostile input."""
    with RawSMTP(port) as c:  # good: AUTH PLAIN, a body with the marker
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("good", extra=BODY_MARKER + b"\r\n")
                           ).startswith(b"250")
    with RawSMTP(port) as c:  # AUTH LOGIN in two steps, then a wrong password, an unknown user
        c.ehlo()
        assert c.cmd("AUTH LOGIN").startswith(b"334")
        assert c.cmd(base64.b64encode(DEMO_USER.encode())).startswith(b"334")
        assert c.cmd(base64.b64encode(WRONG_PASSWORD.encode())).startswith(b"535")
        assert c.cmd(f"AUTH PLAIN {plain_blob('erp', WRONG_PASSWORD)}").startswith(b"535")
        assert c.cmd(f"AUTH PLAIN {plain_blob('nobody', WRONG_PASSWORD)}").startswith(b"535")
        assert c.cmd("AUTH PLAIN !!" + WRONG_PASSWORD).startswith(b"501")
        c.login()
        # refused by policy (two From fields) after the body was read
        reply = c.send_mail(STANDARD_MAILBOX, [RCPT], b"From: a@contoso.com\r\nFrom: b@contoso.com\r\n\r\n"
                            + BODY_MARKER + b"\r\n.\r\n")
        assert reply.startswith(b"554")
        # too big
        reply = c.send_mail(STANDARD_MAILBOX, [RCPT], b"Subject: big\r\n\r\n" + (BODY_MARKER + b"\r\n") * 2000
                            + b".\r\n")
        assert reply.startswith(b"552")
        # a smuggling attempt with the marker in the smuggled part; unknown command with the password
        reply = c.send_mail(STANDARD_MAILBOX, [RCPT], b"Subject: smuggle\r\n\r\nx\n.\r\n" + BODY_MARKER
                            + b"\r\n.\r\n")
        assert reply.startswith(b"250")
        c.cmd("X-" + DEMO_PASSWORD)
    if tls_port is not None and ca_file is not None:
        import ssl

        ctx = ssl.create_default_context(cafile=str(ca_file))
        with RawSMTP(tls_port, tls=ctx) as c:
            c.ehlo()
            c.login()
            assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("tls", extra=BODY_MARKER + b"\r\n")
                               ).startswith(b"250")


@pytest.fixture
def listener_tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key, ca_file = tmp_path / "l-cert.pem", tmp_path / "l-key.pem", tmp_path / "l-ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


def leak_config(m365: SimulatedM365, workdir: Path, tls: tuple[Path, Path, Path], *, port: int = 0,
                tls_port: int = 0, http: str | None = None) -> dict[str, Any]:
    cert, key, _ = tls
    return relay_config(m365, workdir, port=port, overrides={
        "listen": [{"address": f"127.0.0.1:{port}", "tls": "none"},
                   {"address": f"127.0.0.1:{tls_port}", "tls": "implicit"}],
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "limits": {"max_message_size": 20000, "auth_failures": {"delay": 0.001, "max_delay": 0.002}},
        "observability": {"log_format": "json", "log_level": "debug", **({"http": http} if http else {})},
    })


@pytest.fixture
def root_at_debug() -> Iterator[io.StringIO]:
    """The product's logging setup (observability.setup_logging) at DEBUG into a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("mail.log", "msal", "urllib3", "asyncio", "aiosmtplib")}
    buf = io.StringIO()
    setup_logging("json", "debug", stream=buf)
    try:
        yield buf
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)


class _Everything(logging.Handler):
    """Every record from every logger at every level, rendered every way we render logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.chunks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.chunks.append(JsonFormatter().format(record))
        self.chunks.append(TextFormatter().format(record))
        self.chunks.append(repr(record.args))
        self.chunks.append(repr(vars(record)))
        if record.exc_info and record.exc_info[1] is not None:
            self.chunks.append(logging.Formatter().formatException(record.exc_info))


def test_no_secret_in_logs_in_process(m365: SimulatedM365, tmp_path: Path, root_at_debug: io.StringIO,
                                      listener_tls: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    # Stricter than production: the libraries' loggers at DEBUG too (setup_logging keeps them at WARNING).
    for name in ("mail.log", "msal", "urllib3", "asyncio", "aiosmtplib"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    everything = _Everything()
    relay_logger = logging.getLogger()
    relay_logger.addHandler(everything)  # every logger, rendered every way
    logging.getLogger().addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        relay = RelayThread.from_dict(leak_config(m365, tmp_path, listener_tls)).start()
        try:
            run_flows(relay.port, relay.relay.ports[1], listener_tls[2])
            m365.exchange.wait_for_messages(3, timeout=20)
            # a refusal by Exchange (token rejected) and a token re-fetch: more logging paths
            m365.revoke_full_access(STANDARD_MAILBOX, "22222222-2222-2222-2222-222222222222")
            with RawSMTP(relay.port) as c:
                c.ehlo()
                c.login()
                c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("held", extra=BODY_MARKER + b"\r\n"))
        finally:
            relay.stop()
    finally:
        relay_logger.removeHandler(everything)
        logging.getLogger().removeHandler(caplog.handler)
    found = canaries(m365, listener_tls[1].read_bytes())
    output = root_at_debug.getvalue()
    assert '"event": "auth_failed"' in output and '"event": "received"' in output  # capture really worked
    assert_no_canary("root log at DEBUG", output, found)
    assert_no_canary("caplog", caplog.text, found)
    assert_no_canary("log records", "\n".join(everything.chunks), found)


def test_no_secret_in_subprocess_output_metrics_or_check(m365: SimulatedM365, tmp_path: Path,
                                                         listener_tls: tuple[Path, Path, Path]) -> None:
    port, tls_port, http_port = free_port(), free_port(), free_port()
    config = leak_config(m365, tmp_path, listener_tls, port=port, tls_port=tls_port, http=f"127.0.0.1:{http_port}")
    path = write_config(config, tmp_path / "relay.yaml")
    proc = RelayProcess(path, log_path=tmp_path / "relay.log")
    proc.start(port)
    try:
        run_flows(port, tls_port, listener_tls[2])
        m365.exchange.wait_for_messages(3, timeout=20)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
        try:
            ready = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10).read().decode()
        except urllib.error.HTTPError as exc:
            ready = exc.read().decode()
    finally:
        assert proc.terminate(30) == 0
    check = subprocess.run([sys.executable, "-m", "relay", "check", "--offline", "-c", str(path)],
                           capture_output=True, text=True, timeout=60)
    log = (tmp_path / "relay.log").read_text()
    found = canaries(m365, listener_tls[1].read_bytes())
    assert '"auth_failed"' in log and '"received"' in log  # the capture really worked
    assert_no_canary("subprocess log (DEBUG)", log, found)
    assert_no_canary("/metrics", metrics, found)
    assert_no_canary("/readyz", ready, found)
    assert_no_canary("check output", check.stdout + check.stderr, found)


# --------------------------------------------------------------------------- inline secret warning

def _config_with(m365: SimulatedM365, tmp_path: Path, **app: Any) -> dict[str, Any]:
    cfg = relay_config(m365, tmp_path)
    cfg["apps"][0].pop("client_secret")
    cfg["apps"][0].update(app)
    return cfg


def test_warns_when_inline_secret_file_is_readable_by_others(m365: SimulatedM365, tmp_path: Path) -> None:
    path = write_config(relay_config(m365, tmp_path), tmp_path / "relay.yaml")
    path.chmod(0o644)
    load_settings(path)
    assert len(relay_config_module.load_warnings) == 1
    warning = relay_config_module.load_warnings[0]
    assert "apps[0].client_secret" in warning and "chmod 600" in warning and STANDARD_SECRET not in warning
    path.chmod(0o640)
    load_settings(path)
    assert len(relay_config_module.load_warnings) == 1
    path.chmod(0o600)
    load_settings(path)
    assert relay_config_module.load_warnings == []


@pytest.mark.parametrize("kind", ["env", "file"])
def test_no_warning_when_secret_is_referenced(m365: SimulatedM365, tmp_path: Path, kind: str) -> None:
    if kind == "env":
        cfg = _config_with(m365, tmp_path, client_secret="${RELAY_TEST_SECRET}")
        env = {**os.environ, "RELAY_TEST_SECRET": STANDARD_SECRET}
    else:
        (tmp_path / "secret.txt").write_text(STANDARD_SECRET)
        cfg = _config_with(m365, tmp_path, client_secret_file=str(tmp_path / "secret.txt"))
        env = dict(os.environ)
    path = write_config(cfg, tmp_path / "relay.yaml")
    path.chmod(0o644)
    settings = load_settings(path, env=env)
    assert settings.apps[0].client_secret is not None
    assert settings.apps[0].client_secret.get_secret_value() == STANDARD_SECRET
    assert relay_config_module.load_warnings == []
    assert STANDARD_SECRET not in repr(settings) and STANDARD_SECRET not in str(settings.model_dump())


def test_warning_is_logged_at_start(m365: SimulatedM365, tmp_path: Path) -> None:
    port = free_port()
    path = write_config(relay_config(m365, tmp_path, port=port), tmp_path / "relay.yaml")
    path.chmod(0o604)
    proc = RelayProcess(path, log_path=tmp_path / "relay.log")
    proc.start(port)
    try:
        wait_until(lambda: "config_warning" in (tmp_path / "relay.log").read_text(), 10, "the warning")
    finally:
        proc.terminate(30)
    lines = [json.loads(ln) for ln in (tmp_path / "relay.log").read_text().splitlines() if ln.startswith("{")]
    warning = next(ln for ln in lines if ln.get("event") == "config_warning")
    assert warning["level"] == "warning" and "chmod 600" in warning["msg"]
    assert STANDARD_SECRET not in (tmp_path / "relay.log").read_text()
