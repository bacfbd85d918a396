"""Silent networks never hang the relay: every wait has a deadline, and a passed one is said precisely.

Real processes (``oauth-smtp-relay check`` and ``serve``) against the simulated Microsoft 365, with
one endpoint replaced by a tarpit (accepts TCP, never answers) or reached through a proxy that
accepts CONNECT and then forwards nothing (relay.testing.tarpit). Short timeouts (2 s) keep it fast.
"""

from __future__ import annotations

import json
import select
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.testing.harness import RelayProcess, free_port, http_get, relay_config, wait_until, write_config
from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_MAILBOX, STANDARD_TENANT, SimulatedM365
from relay.testing.tarpit import SilentProxy, Tarpit

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 2  # apps[].timeout and delivery.timeout in these tests
STOP_GRACE = 2


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def sample(metrics: str, name: str) -> float:
    """The value of one sample (name with its labels, as printed) of a /metrics page; 0 when absent."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def log_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]


def send(port: int, subject: str) -> tuple[int, str]:
    raw = f"From: {STANDARD_MAILBOX}\r\nTo: x@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("app.test")
        c.mail(STANDARD_MAILBOX)
        c.rcpt("x@example.org")
        code, text = c.data(raw)
    return code, text.decode()


def queue_show(config: Path, queue_id: str) -> dict[str, Any]:
    out = run_cli("queue", "-c", str(config), "--json", "show", queue_id)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


# --------------------------------------------------------------------------- the silent endpoints

class Silence:
    """One silent network between the relay and Microsoft 365, and how to make it answer again."""

    def __init__(self, kind: str, m365: SimulatedM365) -> None:
        self.kind = kind
        self.m365 = m365
        self.proxy: SilentProxy | None = None
        self.tarpit: Tarpit | None = None
        if kind == "token":
            # The token endpoint itself goes silent, on its own port: stop it, hold its port.
            self.port = m365.entra.port
            m365.entra.stop()
            self.tarpit = Tarpit(port=self.port).start()
        elif kind == "token-tls":
            # TLS handshake done, then nothing: no HTTP answer.
            self.tarpit = Tarpit(mode="tls-silent", tls_context=m365.certs.server_context()).start()
            self.port = self.tarpit.port
        elif kind == "smtp":
            self.tarpit = Tarpit(target=("127.0.0.1", m365.smtp_port)).start()
            self.port = self.tarpit.port
        else:
            self.proxy = SilentProxy(mode="blackhole" if kind == "proxy-blackhole" else "silent").start()
            self.port = self.proxy.port

    def app_overrides(self) -> dict[str, Any]:
        if self.kind == "token-tls":
            return {"authority_host": f"https://localhost:{self.port}"}
        if self.kind == "smtp":
            return {"smtp_port": self.port}
        if self.kind.startswith("proxy"):
            return {"proxy": f"http://127.0.0.1:{self.port}"}
        return {}

    @property
    def connections(self) -> int:
        held = self.tarpit or self.proxy
        assert held is not None
        return held.accepted

    def answer_again(self) -> None:
        if self.kind == "token":
            assert self.tarpit is not None
            self.tarpit.stop()
            self.m365.entra.start()  # the same port again
        elif self.kind == "smtp":
            assert self.tarpit is not None
            self.tarpit.mode = "forward"
        else:
            assert self.proxy is not None
            self.proxy.mode = "forward"

    def close(self) -> None:
        for held in (self.tarpit, self.proxy):
            if held is not None:
                held.stop()


@pytest.fixture
def silence(m365: SimulatedM365, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Silence]]:
    made: list[Silence] = []

    def make(kind: str) -> Silence:
        made.append(Silence(kind, m365))
        return made[-1]

    yield make
    for s in made:
        s.close()


def config_with(m365: SimulatedM365, tmp_path: Path, silence: Silence, *, port: int = 0,
                app_timeout: float = TIMEOUT, smtp_timeout: float = TIMEOUT,
                **overrides: Any) -> Path:
    base = relay_config(m365, tmp_path, port=port)
    app = dict(base["apps"][0], timeout=app_timeout, **silence.app_overrides())
    config = relay_config(m365, tmp_path, port=port, overrides={
        "apps": [app],
        "delivery": {"sync_wait": 10, "timeout": smtp_timeout, "stop_grace": STOP_GRACE,
                     "retry": {"first": 4, "max": 4}},
        **overrides})
    return write_config(config, tmp_path / "relay.yaml")


# --------------------------------------------------------------------------- check

CHECK_CASES = {
    # kind: (failing step kind, what its detail says)
    "token": ("token", "connected, no TLS handshake"),
    "token-tls": ("token", "connected, no HTTP answer"),
    "smtp": ("tcp", "connected, no SMTP greeting"),
    "proxy-silent": ("token", "accepted the connection but did not answer CONNECT"),
    "proxy-blackhole": ("token", "connected, no TLS handshake"),
}


@pytest.mark.parametrize("kind", list(CHECK_CASES))
def test_check_ends_within_its_deadlines_and_says_what_did_not_answer(
        kind: str, m365: SimulatedM365, tmp_path: Path, silence: Callable[[str], Silence]) -> None:
    silent = silence(kind)
    config = config_with(m365, tmp_path, silent)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "relay", "check", "-c", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Each step is printed as it ends: the configuration line comes while the silent step still waits.
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "check printed nothing within 30 s"
        first = proc.stdout.readline()
        assert first.startswith("[PASS] configuration"), first
        assert proc.poll() is None, "the first line must come before the end"
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, (first, rest, err)
    assert "Traceback" not in err, err
    failing_kind, what = CHECK_CASES[kind]
    lines = rest.splitlines()
    [failed] = [line for line in lines if line.startswith("[FAIL]")][:1]
    assert "no answer from" in failed and f"within {TIMEOUT}s" in failed and what in failed, rest
    assert silent.connections >= 1, "the silent endpoint was really asked"
    # Per-step deadlines: the token step gives up after apps[].timeout (+1 s margin), each SMTP wait
    # after delivery.timeout; the whole run stays far below a hang.
    assert elapsed < 6 * TIMEOUT + 10, elapsed
    # The JSON form says the same, with the step's stable kind.
    report = json.loads(run_cli("check", "-c", str(config), "--json").stdout)
    step = next(s for s in report["steps"] if s["status"] == "fail")
    assert step["kind"] == failing_kind and what in step["detail"], step


def test_check_says_connection_refused_and_peer_closed_apart_from_certificates(
        m365: SimulatedM365, tmp_path: Path) -> None:
    import socket
    import threading

    # A peer that accepts and closes at once: not "certificate not trusted".
    server = socket.create_server(("127.0.0.1", 0))
    closer_port = server.getsockname()[1]
    stop = threading.Event()

    def close_all() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.close()

    threading.Thread(target=close_all, daemon=True).start()
    try:
        base = relay_config(m365, tmp_path)
        app = dict(base["apps"][0], timeout=TIMEOUT, authority_host=f"https://localhost:{closer_port}")
        config = write_config(relay_config(m365, tmp_path, overrides={"apps": [app]}), tmp_path / "closed.yaml")
        report = json.loads(run_cli("check", "-c", str(config), "--json").stdout)
        token = next(s for s in report["steps"] if s["kind"] == "token")
        assert token["status"] == "fail"
        # (during the TLS handshake, or a reset before it: which one depends on timing)
        assert "closed the connection" in token["detail"], token
        assert "not trusted" not in token["detail"] and token["admin_step"] is None, token

        refused = dict(base["apps"][0], timeout=TIMEOUT, smtp_port=free_port())
        config = write_config(relay_config(m365, tmp_path, overrides={"apps": [refused]}), tmp_path / "refused.yaml")
        report = json.loads(run_cli("check", "-c", str(config), "--json").stdout)
        tcp = next(s for s in report["steps"] if s["kind"] == "tcp")
        assert tcp["status"] == "fail" and tcp["detail"] == "connection refused", tcp
    finally:
        stop.set()
        server.close()


# --------------------------------------------------------------------------- serve

SERVE_CASES = {
    # kind: (what the deferred message's last reply says, the reason, token failure metric expected)
    "token": ("connected, no TLS handshake", "token_unavailable", True),
    "smtp": ("connected, no SMTP greeting", "timeout", False),
    "proxy-blackhole": ("connected, no TLS handshake", "token_unavailable", True),
    "proxy-silent": ("did not answer CONNECT", "token_unavailable", True),
}


@pytest.mark.parametrize("kind", list(SERVE_CASES))
def test_serve_defers_within_the_timeout_and_delivers_once_the_endpoint_answers(
        kind: str, m365: SimulatedM365, tmp_path: Path, silence: Callable[[str], Silence]) -> None:
    silent = silence(kind)
    port, http_port = free_port(), free_port()
    config = config_with(m365, tmp_path, silent, port=port, observability={
        "log_format": "json", "log_level": "info", "http": f"127.0.0.1:{http_port}"})
    relay = RelayProcess(config).start(port)
    try:
        started = time.monotonic()
        code, text = send(port, f"through a silent {kind}")
        waited = time.monotonic() - started
        assert code == 250 and "queued as" in text, text
        # The attempt gave up after the timeout (+1 s margin), not after sync_wait (10 s) or never.
        assert waited < TIMEOUT + 4, waited
        queue_id = text.rsplit(" ", 1)[-1]
        what, reason, token_metric = SERVE_CASES[kind]
        shown = queue_show(config, queue_id)
        assert shown["attempts"] == 1 and shown["state"] == "queued", shown
        assert "no answer from" in shown["last_reply"] and f"within {TIMEOUT}s" in shown["last_reply"], shown
        assert what in shown["last_reply"] and shown["reason"].startswith(reason), shown
        assert m365.exchange.accepted == []
        # Logged with the endpoint.
        events = log_events(relay.log_path)
        deferred = [e for e in events if e.get("event") == "deferred"]
        assert deferred and deferred[0]["reason"] == reason and what in deferred[0]["reply"], deferred
        if token_metric:
            [failed] = [e for e in events if e.get("event") == "token_failed"][:1]
            assert failed["endpoint"] == f"localhost:{m365.entra.port}" and failed["error"] == "timeout", failed
        else:
            [timeout] = [e for e in events if e.get("event") == "upstream_timeout"][:1]
            assert timeout["endpoint"] == f"localhost:{silent.port}" and timeout["stage"] == "connect", timeout
        # Whichever endpoint is silent, every message of the app would meet it: the app is paused, which
        # /readyz and `queue holds` show with the reason. The pause lasts retry.first (4 s) and comes
        # back with each failed attempt while the endpoint is silent.
        readyz = f"http://127.0.0.1:{http_port}/readyz"
        seen: list[tuple[int, dict[str, Any]]] = []

        def paused() -> bool:
            status, body = http_get(readyz)
            ready = json.loads(body)
            seen.append((status, ready))
            return bool(ready["pauses"])

        wait_until(paused, 15, "the app's pause in /readyz")
        status, ready = seen[-1]
        assert status == 503 and [p["name"] for p in ready["pauses"]] == ["contoso"], ready
        assert what in ready["pauses"][0]["reply"], ready
        if not token_metric:  # the SMTP host: where to look
            assert "firewall" in ready["pauses"][0]["hint"], ready
        wait_until(lambda: "PAUSED app contoso" in run_cli("queue", "-c", str(config), "holds").stdout, 20,
                   "queue holds to show the pause")
        holds = json.loads(run_cli("queue", "-c", str(config), "--json", "holds").stdout)["holds"]
        assert all(what in h["reply"] and h["kind"] == "pause" for h in holds), holds
        _, metrics = http_get(f"http://127.0.0.1:{http_port}/metrics")
        assert sample(metrics, f'relay_messages_deferred_total{{reason="{reason}"}}') >= 1, metrics
        if token_metric:
            assert sample(metrics, 'relay_token_failures_total{app="contoso",error="timeout"}') >= 1, metrics

        # The endpoint answers again: the message goes at its next attempt.
        silent.answer_again()
        wait_until(lambda: len(m365.exchange.accepted) == 1, 30, "delivery once the endpoint answers")
        wait_until(lambda: http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200, 10, "ready again")
    finally:
        relay.kill()


@pytest.mark.parametrize("kind", ["token", "smtp", "proxy-blackhole"])
def test_sigterm_ends_serve_within_stop_grace_while_an_attempt_waits_on_silence(
        kind: str, m365: SimulatedM365, tmp_path: Path, silence: Callable[[str], Silence]) -> None:
    """The waits are long here (60 s): only a bounded shutdown lets the process end in time."""
    silent = silence(kind)
    port = free_port()
    config = config_with(m365, tmp_path, silent, port=port, app_timeout=60, smtp_timeout=60)
    relay = RelayProcess(config).start(port)
    try:
        raw = f"From: {STANDARD_MAILBOX}\r\nTo: x@example.org\r\nSubject: stop\r\n\r\nbody\r\n"
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("app.test")
        client.mail(STANDARD_MAILBOX)
        client.rcpt("x@example.org")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(raw.encode() + b".\r\n")  # the sync attempt starts; its reply is not awaited
        wait_until(lambda: silent.connections >= 1, 15, "the attempt to reach the silent endpoint")
        assert relay.proc is not None
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        code = relay.proc.wait(STOP_GRACE + 5)
        elapsed = time.monotonic() - started
        client.close()
        assert code == 0, code
        assert elapsed < STOP_GRACE + 5, elapsed
        events = log_events(relay.log_path)
        assert any(e.get("event") == "stopped" for e in events), events[-5:]
    finally:
        relay.kill()
    # The message was not lost: the next start finds it in the spool.
    listed = json.loads(run_cli("queue", "-c", str(config), "--json", "list").stdout)
    assert len(listed) == 1 and listed[0]["state"] in ("queued", "active"), listed


def test_graph_endpoint_that_never_answers_defers_then_delivers(m365: SimulatedM365, tmp_path: Path) -> None:
    from relay.testing.harness import RelayThread

    m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, ["Mail.Send"])
    graph_port = int(m365.graph_host.rsplit(":", 1)[1])
    with Tarpit(target=("127.0.0.1", graph_port)) as tarpit:
        base = relay_config(m365, tmp_path)
        app = dict(base["apps"][0], graph_host=f"https://localhost:{tarpit.port}")
        mbx = {"address": STANDARD_MAILBOX, "app": "contoso", "transport": "graph"}
        config = relay_config(m365, tmp_path, overrides={
            "apps": [app], "mailboxes": [mbx],
            "delivery": {"sync_wait": 10, "timeout": TIMEOUT, "retry": {"first": 1, "max": 2}}})
        with RelayThread.from_dict(config) as relay:
            started = time.monotonic()
            code, text = send(relay.port, "graph is silent")
            assert code == 250 and "queued as" in text, text
            assert time.monotonic() - started < 2 * TIMEOUT + 4
            entry = relay.relay.spool.get(text.rsplit(" ", 1)[-1])
            assert entry is not None and entry.attempts == 1, entry
            assert entry.last_reply == f"Microsoft Graph: no answer from localhost:{tarpit.port} within {TIMEOUT}s"
            assert m365.graph.accepted == []
            tarpit.mode = "forward"
            wait_until(lambda: len(m365.graph.accepted) == 1, 30, "delivery once Graph answers")


def test_call_with_deadline_leaves_no_thread_behind_the_caller() -> None:
    import asyncio
    import threading

    from relay.blocking import call_with_deadline

    release = threading.Event()
    names: list[str] = []

    def stuck() -> str:
        names.append(threading.current_thread().name)
        assert threading.current_thread().daemon, "a stuck call must not keep the process alive"
        release.wait(30)
        return "late"

    def boom() -> str:
        raise ValueError("from the thread")

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await call_with_deadline(stuck, 0.3, name="stuck-call")
        assert time.monotonic() - started < 5
        assert await call_with_deadline(lambda: "quick", 5) == "quick"
        with pytest.raises(ValueError, match="from the thread"):
            await call_with_deadline(boom, 5)

    asyncio.run(main())
    assert names == ["stuck-call"]
    release.set()  # the stuck thread finishes after its caller gave up: its result goes nowhere


def test_token_session_puts_the_timeout_on_every_request(m365: SimulatedM365, tmp_path: Path) -> None:
    """MSAL sends its requests without a timeout: the session adds apps[].timeout (REQUESTS_CA_BUNDLE
    and proxies from the environment stay ignored)."""
    from relay.config import settings_from_dict
    from relay.microsoft.tokens import TimeoutSession, build_http_session

    settings = settings_from_dict(relay_config(m365, tmp_path))
    session = build_http_session(settings.apps[0], {"REQUESTS_CA_BUNDLE": "/nonexistent"})
    assert isinstance(session, TimeoutSession) and session.timeout == 10 and session.trust_env is False
    with Tarpit() as tarpit:
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            TimeoutSession(1).get(f"http://127.0.0.1:{tarpit.port}/")
        assert time.monotonic() - started < 5
        assert "timed out" in str(caught.value).lower()


async def test_data_to_a_server_that_stops_reading_ends_at_the_command_timeout(tmp_path: Path) -> None:
    """After 354 the server reads nothing more: the socket buffers fill and the stream must not wait forever."""
    import asyncio

    import aiosmtplib

    from relay.microsoft.smtp_transaction import stream_data

    held: list[asyncio.StreamWriter] = []

    async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        writer.write(b"220 stall.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                return  # and never read again
            writer.write(b"250 stall.test\r\n")
            await writer.drain()

    server = await asyncio.start_server(stalling, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = tmp_path / "big.eml"
    line = b"x" * 998 + b"\r\n"
    with body.open("wb") as f:
        for _ in range(64):
            f.write(b"Subject: big\r\n\r\n" + line * 1024)  # 64 MiB: more than any socket buffers hold
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
    try:
        await smtp.connect()
        await smtp.ehlo()
        started = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            async with asyncio.timeout(30):
                await stream_data(smtp, body, 1.0)
        assert time.monotonic() - started < 15
    finally:
        smtp.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_docs_show_a_real_silent_token_endpoint_run(m365: SimulatedM365, tmp_path: Path,
                                                    silence: Callable[[str], Silence]) -> None:
    """docs/check.md shows the run of check against a token endpoint that never answers: keep it in step."""
    import re

    silent = silence("token")
    config = config_with(m365, tmp_path, silent)
    out = run_cli("check", "-c", str(config)).stdout
    text = out.replace(str(config), "config.yaml").replace(f"within {TIMEOUT}s", "within 30s")
    text = text.replace(f"localhost:{silent.port}", "login.microsoftonline.com")
    text = re.sub(r"localhost:\d+", "smtp.office365.com:587", text)
    snapshot = (ROOT / "docs" / "check.md").read_text()
    assert "[FAIL] token for app contoso" in text, text
    for line in text.splitlines():
        assert line in snapshot, f"docs/check.md is out of date; missing line:\n{line}"
